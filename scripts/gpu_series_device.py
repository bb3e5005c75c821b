#!/usr/bin/env python3
"""On the GPU machine: receive the carry batches of scripts/gpu_series_bundle.py and run gpu_series.py
on each runtime set as soon as its wheels are complete (docs/releases.md).

  python3 scripts/gpu_series_device.py carry .device/series/batchNN [SETTLE_SECONDS]
  python3 scripts/gpu_series_device.py wait SECONDS        (then the merged report, and logs into $OUT)
GPU_SERIES_ARGS is passed on to gpu_series.py (e.g. --ab for the timing-only A/B run);
GPU_SERIES_NORUN=1 only unpacks (for scripts/gpu_hd512.py).

Pieces (`<file>.<offset>`) collect under /tmp/gs/in (kept while the machine stays warm); a file is
used once its pieces concatenate to the sha256 of SHA256SUMS (batch00). When every file is there,
each set's wheels are unpacked, in plan order, into /tmp/gs/runtime/<set>, and one gpu_series.py run
for all pins starts in the background (setsid).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

from gpu_carry import recv  # same directory

G = Path("/tmp/gs")
HERE = Path(__file__).resolve().parent


def carry(batch: Path, settle: int) -> None:
    files, _ = recv(batch, G)
    if "plan.json" not in files or "trees.tar.xz" not in files:
        return
    if not (G / "trees").is_dir():
        with tarfile.open(files["trees.tar.xz"]) as tf:
            tf.extractall(G, filter="data")
        (G / "out").mkdir(exist_ok=True)
        shutil.copy(files["plan.json"], G / "plan.json")
        (G / "scripts").mkdir(exist_ok=True)
        for s in ("gpu_series.py", "gpu_common.py"):
            shutil.copy(HERE / s, G / "scripts" / s)
    plan = json.loads((G / "plan.json").read_text())
    wheels = {spec["runtime"]: spec["runtime_wheels"] for spec in plan.values()}
    if not all(w in files for ws in wheels.values() for w in ws) or (G / "out" / "run.log").exists():
        return
    for name, ws in wheels.items():
        for w in ws:  # in install order: the [cu13] libraries overwrite libs-base's same paths
            with zipfile.ZipFile(files[w]) as zf:
                zf.extractall(G / "runtime" / name)
    if os.environ.get("GPU_SERIES_NORUN") == "1":  # unpacked for another harness (gpu_hd512.py)
        (G / "out" / "run.log").write_text("not started: GPU_SERIES_NORUN=1\n")
        print(f"unpacked: {sorted(plan)}", flush=True)
        return
    # one run for every pin: all compile side by side, then each is checked and timed alone
    env = {**os.environ, "OUT": str(G / "out")}
    with open(G / "out" / "run.log", "w") as log:
        subprocess.Popen([sys.executable, str(G / "scripts" / "gpu_series.py"), "--bundle", str(G),
                          "--jobs", str(2 * len(plan)), *os.environ.get("GPU_SERIES_ARGS", "").split()], cwd=G, env=env,
                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    print(f"started: {sorted(plan)}", flush=True)
    time.sleep(settle)
    for log in sorted((G / "out").glob("run_*.log")):
        print(f"--- {log.name}: {log.read_text()[-400:]}")


def wait(seconds: int) -> int:
    end = time.monotonic() + seconds
    def running() -> bool:
        return subprocess.run(["pgrep", "-f", "gpu_series.py --bundle"], capture_output=True).returncode == 0
    while time.monotonic() < end and running():
        time.sleep(10)
    if running():
        print("STILL RUNNING", flush=True)
    out = Path(os.environ.get("OUT", "out"))
    results = sorted((G / "out").glob("gpu_series*.json"))
    r = subprocess.run([sys.executable, str(G / "scripts" / "gpu_series.py"), "--report", *map(str, results)],
                       env={**os.environ, "OUT": str(out)})
    with tarfile.open(out / "logs.tgz", "w:gz") as tf:
        for f in sorted((G / "out").glob("*.txt")) + sorted((G / "out").glob("*.log")):
            tf.add(f, arcname=f.name)
    return r.returncode


if __name__ == "__main__":
    if sys.argv[1] == "carry":
        carry(Path(sys.argv[2]), int(sys.argv[4]) if len(sys.argv) > 4 else 20)
    else:
        sys.exit(wait(int(sys.argv[2])))
