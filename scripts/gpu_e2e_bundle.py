#!/usr/bin/env python3
"""Prepare what `vllm-forge bench` needs on the GPU machine (no network), under .device/e2e/.

  python scripts/gpu_e2e_bundle.py [--vllm 0.22.1]

  stock.whl, forged.whl  the release's wheel (sha256-checked through the tool's cache) and the one
                    `vllm-forge build` makes of it, both without what the bench never loads:
                    _vllm_fa2_C (FA3 serves SM90), _moe_C (a dense model), the vllm-rs frontend binary
  wheels/           vLLM's Python dependencies the GPU image lacks (scripts/data/e2e-device-wheels.txt)
                    and the release's own FA4 runtime (its requirements/cuda.txt lines, resolved as
                    scripts/gpu_series_bundle.py does; libs-base is left out: the [cu13] wheel holds
                    all its files)
  batchNN/          the carry of one device call each (scripts/gpu_carry.py), SHA256SUMS in batch00
There, after `python3 scripts/gpu_carry.py recv .device/e2e/batchNN /tmp/e2e/carry` of every batch:
  cd /tmp/e2e/carry/files && for s in stock forged; do pip install -q --no-deps --target /tmp/e2e/$s $s.whl; done
  pip install -q --no-deps --target /tmp/e2e/site $(ls *.whl | grep -v -e ^stock.whl -e ^forged.whl)
  vllm-forge bench --stock-path /tmp/e2e/stock --forged-path /tmp/e2e/forged --site /tmp/e2e/site --out OUT
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
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
    for name, whl in (("stock", base), ("forged", forged)):
        shutil.copy(whl, OUT / f"{name}.whl")
        subprocess.run(["zip", "-q", "-d", str(OUT / f"{name}.whl"), *DROP], check=True)
    wheels = OUT / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    specs = [ln.strip() for ln in DEPS.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    runtime = [s for s in resolve_runtime(vp.fa4_requires) if not s.startswith("nvidia-cutlass-dsl-libs-base==")]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp",
                    *[a for p in PLATFORMS + ["manylinux_2_24_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64",
                                              "manylinux1_x86_64"] for a in ("--platform", p)],
                    "-d", str(wheels), *specs, *runtime], check=True)
    files = sorted(wheels.glob("*.whl"), key=lambda p: p.stat().st_size) + [OUT / "stock.whl", OUT / "forged.whl"]
    write_batches(files, OUT)
    print(f"runtime: {', '.join(runtime)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
