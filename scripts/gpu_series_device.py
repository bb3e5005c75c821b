#!/usr/bin/env python3
"""On the GPU machine: receive the carry batches of scripts/gpu_series_bundle.py and run `vllm-forge validate`
on every series once all its files are there (docs/releases.md).

  python3 scripts/gpu_series_device.py carry .device/series/batchNN
  python3 scripts/gpu_series_device.py wait SECONDS      (then the results, records and logs into $OUT)

Pieces collect under /tmp/gs/in (kept while the machine stays warm; scripts/gpu_carry.py). When every
file is there, each runtime set's wheels are unpacked, in plan order, into /tmp/gs/runtime/<set>, and one
background process (setsid) validates the pins one after the other:
  vllm-forge validate --wheel forged-<pin>.zip --stock-wheel stock-<pin>.zip --path runtime/<set> --vllm <release>
with this checkout's src/ on PYTHONPATH and the records in /tmp/gs/out/records (VLLM_FORGE_USER_DATA_DIR).
Here, `python scripts/series_records.py validation OUT/validate-*.json` writes them into the manifest.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

from gpu_carry import recv  # same directory

G = Path("/tmp/gs")
SRC = Path(__file__).resolve().parents[1] / "src"


def carry(batch: Path) -> None:
    files, _ = recv(batch, G)
    if "plan.json" not in files:
        return
    plan = json.loads(files["plan.json"].read_text())
    need = [f"{side}-{pin}.zip" for pin in plan for side in ("stock", "forged")]
    need += [w for spec in plan.values() for w in spec["runtime_wheels"]]
    if not all(n in files for n in need) or (G / "out" / "run.log").exists():
        return
    for spec in plan.values():
        for w in spec["runtime_wheels"]:  # in install order: the [cu13] libraries overwrite libs-base's paths
            with zipfile.ZipFile(files[w]) as zf:
                zf.extractall(G / "runtime" / spec["runtime"])
    (G / "out").mkdir(exist_ok=True)
    steps = [[sys.executable, "-m", "vllm_forge.cli", "validate", "--wheel", str(files[f"forged-{pin}.zip"]),
              "--stock-wheel", str(files[f"stock-{pin}.zip"]), "--path", str(G / "runtime" / spec["runtime"]),
              "--vllm", spec["release"], "--out", str(G / "out")] for pin, spec in sorted(plan.items())]
    script = "; ".join(f"echo == {shlex.quote(s[5])}; " + shlex.join(s) for s in steps) + "; echo ALL DONE"
    env = {**os.environ, "PYTHONPATH": str(SRC), "VLLM_FORGE_USER_DATA_DIR": str(G / "out" / "records")}
    with open(G / "out" / "run.log", "w") as log:
        subprocess.Popen(["bash", "-c", script], cwd=G, env=env, stdout=log, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, start_new_session=True)
    print(f"started: {sorted(plan)}", flush=True)


def wait(seconds: int) -> int:
    log = G / "out" / "run.log"
    end = time.monotonic() + seconds
    while time.monotonic() < end and "ALL DONE" not in log.read_text(errors="replace"):
        time.sleep(10)
    text = log.read_text(errors="replace")
    print(text[-6000:] if "ALL DONE" in text else "STILL RUNNING\n" + text[-3000:], flush=True)
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted((G / "out").glob("validate-*.json")):
        shutil.copy(f, out / f.name)
    with tarfile.open(out / "logs.tgz", "w:gz") as tf:
        tf.add(log, arcname=log.name)
        if (G / "out" / "records").is_dir():
            tf.add(G / "out" / "records", arcname="records")
    return 0 if "ALL DONE" in text else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["carry"] and len(sys.argv) == 3:
        carry(Path(sys.argv[2]))
    elif sys.argv[1:2] == ["wait"] and len(sys.argv) == 3:
        sys.exit(wait(int(sys.argv[2])))
    else:
        sys.exit(__doc__)
