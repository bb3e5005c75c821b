#!/usr/bin/env python3
"""Benchmark: `vllm-forge build` time / `cp` time of the same base wheel, in one run, warm cache.

Also prints the forge's peak RSS. Goals (issue 2): ratio <= 2.0, peak RSS <= 1 GiB.
Usage: python scripts/bench_build.py [--vllm 0.19.1] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vllm_forge.fetch import cache_dir
from vllm_forge.pins import load_pins

VERIFIED_COPY = """
import hashlib, shutil, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    while chunk := f.read(4 << 20):
        h.update(chunk)
shutil.copyfile(sys.argv[1], sys.argv[2])
"""


def timed(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd} failed: {proc.stderr.read().decode() if proc.stderr else ''}")
    return wall, usage.ru_maxrss * 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--vllm", default=None)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    pins = load_pins()
    vpin = pins.for_version(args.vllm or pins.default_vllm)
    forge = [sys.executable, "-m", "vllm_forge.cli", "build", "--vllm", vpin.version]
    with tempfile.TemporaryDirectory(prefix="vllm-forge-bench-", dir=cache_dir()) as tmp:
        out = Path(tmp)
        timed([*forge, "--out", str(out / "warm")])  # fills the caches (downloads on a fresh machine)
        base = cache_dir() / "dl" / vpin.wheel
        size = base.stat().st_size
        verified_copy = [sys.executable, "-c", VERIFIED_COPY, str(base), str(out / "vcopy.whl")]
        cps, vcps, forges, rss = [], [], [], []
        for i in range(args.repeat):
            cps.append(timed(["cp", str(base), str(out / f"copy{i}.whl")])[0])
            vcps.append(timed(verified_copy)[0])
            wall, peak = timed([*forge, "--out", str(out / f"forge{i}")])
            forges.append(wall)
            rss.append(peak)
            shutil.rmtree(out / f"forge{i}")
            (out / f"copy{i}.whl").unlink()
    cp_s, forge_s = min(cps), min(forges)
    print(f"base wheel      : {vpin.wheel} ({size / 1e6:.0f} MB)")
    print(f"cp              : {cp_s:.3f} s  (best of {args.repeat}: {', '.join(f'{t:.3f}' for t in cps)})")
    print(f"vllm-forge build: {forge_s:.3f} s  (best of {args.repeat}: {', '.join(f'{t:.3f}' for t in forges)};"
          " whole CLI process: start-up, sha256 of the base, FA4 tree + CMake, overlay, repack, verify, fsync)")
    vcp_s = min(vcps)
    print(f"verified copy   : {vcp_s:.3f} s  (python: sha256 of the base + shutil.copyfile, best of {args.repeat})")
    print(f"ratio build/cp  : {forge_s / cp_s:.2f}  (goal <= 2.0)")
    print(f"ratio build/verified copy: {forge_s / vcp_s:.2f}")
    print(f"peak RSS        : {max(rss) / 2**20:.0f} MiB  (goal <= 1024 MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
