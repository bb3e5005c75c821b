#!/usr/bin/env python3
"""Prepare what scripts/gpu_e2e.py needs on the GPU machine (no network), under .device/e2e/.

  python scripts/gpu_e2e_bundle.py [--vllm 0.22.1]

  stock.whl         the release's wheel (sha256-checked through the tool's cache) without what the
                    e2e run never loads: _vllm_fa2_C (FA3 serves SM90), _moe_C (a dense model),
                    the vllm-rs frontend binary
  forged-delta.zip  what `vllm-forge build` changed: the members whose RECORD hash differs or that
                    are new (FA4 tree + series, runtime layer, dist-info), and REMOVED (members dropped)
  wheels/           vLLM's Python dependencies the GPU image lacks (scripts/data/e2e-device-wheels.txt)
                    and the release's own FA4 runtime (its requirements/cuda.txt lines, resolved as
                    scripts/gpu_series_bundle.py does; libs-base is left out: the [cu13] wheel holds
                    all its files)
  batchNN/          the carry of one device call each (scripts/gpu_carry.py), SHA256SUMS in batch00
"""

from __future__ import annotations

import argparse
import csv
import io
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from gpu_carry import write_batches
from gpu_series_bundle import PLATFORMS, resolve_runtime

from vllm_forge.build import build
from vllm_forge.fetch import Index, cache_dir
from vllm_forge.pins import load_pins

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / ".device" / "e2e"
DROP = ("vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so", "vllm/_moe_C.abi3.so", "vllm/vllm-rs")
DEPS = Path(__file__).resolve().parent / "data" / "e2e-device-wheels.txt"


def record(zf: zipfile.ZipFile) -> dict[str, str]:
    name = next(n for n in zf.namelist() if n.endswith(".dist-info/RECORD"))
    return {row[0]: row[1] for row in csv.reader(io.StringIO(zf.read(name).decode())) if row}


def delta(stock: Path, forged: Path, dest: Path) -> int:
    with zipfile.ZipFile(stock) as zs, zipfile.ZipFile(forged) as zf, \
            zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as out:
        rs, rf = record(zs), record(zf)
        changed = [n for n in zf.namelist() if n.endswith("RECORD") or rf.get(n) != rs.get(n) or n not in rs]
        for n in changed:
            out.writestr(n, zf.read(n))
        removed = sorted(set(rs) - set(rf))
        out.writestr("REMOVED", "\n".join(removed) + "\n")
    return len(changed)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm", default="0.22.1")
    args = ap.parse_args()
    pins = load_pins()
    vp = pins.for_version(args.vllm)
    OUT.mkdir(parents=True, exist_ok=True)
    forged = build(args.vllm, OUT / "dist").wheel
    base = cache_dir() / "dl" / vp.wheel  # build just verified it (or downloaded it) by sha256
    if not base.is_file():
        base = Index().download(pins.index_project, vp.wheel, vp.wheel_sha256, base.parent)
    stock = OUT / "stock.whl"
    shutil.copy(base, stock)
    subprocess.run(["zip", "-q", "-d", str(stock), *DROP], check=True)
    n = delta(base, forged, OUT / "forged-delta.zip")
    print(f"forged delta: {n} members", file=sys.stderr)
    wheels = OUT / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    specs = [ln.strip() for ln in DEPS.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    runtime = [s for s in resolve_runtime(vp.fa4_requires) if not s.startswith("nvidia-cutlass-dsl-libs-base==")]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp",
                    *[a for p in PLATFORMS + ["manylinux_2_24_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64",
                                              "manylinux1_x86_64"] for a in ("--platform", p)],
                    "-d", str(wheels), *specs, *runtime], check=True)
    files = [OUT / "forged-delta.zip"] + sorted(wheels.glob("*.whl"), key=lambda p: p.stat().st_size) + [stock]
    write_batches(files, OUT)
    print(f"runtime: {', '.join(runtime)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
