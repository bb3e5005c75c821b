#!/usr/bin/env python3
"""Prepare what the GPU machine (no network, torch 2.11 + triton 3.6 installed) needs, under .device/.

  python scripts/gpu_bundle.py WHEEL [--fa4-wheel FA4_WHEEL]

- .device/vllm.tar.xz          the forged wheel's vllm/ package, without compiled objects
                                (vLLM 0.19.1's _C/_vllm_fa*_C are built for torch 2.10 and do not load there)
- .device/stock.tar.xz         the three stock 0.19.1 files and its stock cute/ (for the refusal check)
- .device/whl/*.whl            the Python packages the GPU image lacks (FA4's and vLLM's import deps)
- .device/cutlass-libs.tar.xz  nvidia-cutlass-dsl-libs-base unpacked (its wheel is over the carry limit)
- .device/tests/               vLLM 0.22.0's tests/kernels/attention/test_flash_attn.py (from its sdist)
- .device/fa4/                 the flash-attn-4 wheel of the pin (system FA4), if given
Everything is logged with its sha256 in .device/MANIFEST; the total must stay under 64 MiB.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from functools import cache
from pathlib import Path

from vllm_forge.fetch import Index, cached_download
from vllm_forge.overlay import load_overlay
from vllm_forge.pins import load_pins

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / ".device"
LIMIT = 64 << 20
WHEELS = [*load_pins().fa.tested_with,  # the FA4 runtime set (pins.json)
          # vLLM 0.19.1 import deps the GPU image lacks
          "pyzmq", "msgspec", "cbor2", "gguf", "pybase64", "cachetools",
          "pydantic==2.14.3", "pydantic-core==2.50.4", "annotated-types", "typing-inspection"]
PLATFORMS = ["manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_24_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_28_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64"]


def tar_xz(dest: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(dest, "w:xz", preset=9) as tf:
        for name in sorted(members):
            info = tarfile.TarInfo(name)
            info.size = len(members[name])
            info.mode = 0o644
            tf.addfile(info, io.BytesIO(members[name]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("wheel", type=Path, help="a forged vLLM wheel")
    ap.add_argument("--fa4-wheel", type=Path, help="a flash-attn-4 wheel from vllm-forge build-fa4-wheel")
    args = ap.parse_args()
    shutil.rmtree(OUT, ignore_errors=True)
    (OUT / "whl").mkdir(parents=True)
    pins = load_pins()

    with zipfile.ZipFile(args.wheel) as zf:
        # with its dist-info: vLLM's platform detection reads the installed version
        tar_xz(OUT / "vllm.tar.xz", {n: zf.read(n) for n in zf.namelist()
                                     if n.split("/")[0] == "vllm" or n.split("/")[0].endswith(".dist-info")
                                     if not n.endswith((".so", "/"))})
    index = cache(lambda: Index())
    base = cached_download(index, pins.index_project, pins.vllm["0.19.1"].wheel, pins.vllm["0.19.1"].wheel_sha256)
    with zipfile.ZipFile(base) as zf:
        stock = {p: zf.read(p) for p in load_overlay(pins.vllm["0.19.1"].overlay).paths}
        stock.update({n: zf.read(n) for n in zf.namelist() if n.startswith("vllm/vllm_flash_attn/cute/")})
    tar_xz(OUT / "stock.tar.xz", stock)

    with tempfile.TemporaryDirectory() as tmp:
        for spec in WHEELS:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                            "--python-version", "3.12", "--implementation", "cp",
                            *[a for p in PLATFORMS for a in ("--platform", p)], "-d", tmp, spec], check=True)
        for whl in sorted(Path(tmp).glob("*.whl")):
            if whl.name.startswith("nvidia_cutlass_dsl_libs_base"):
                with zipfile.ZipFile(whl) as zf:
                    tar_xz(OUT / "cutlass-libs.tar.xz", {n: zf.read(n) for n in zf.namelist() if not n.endswith("/")})
            else:
                shutil.copy(whl, OUT / "whl")
    sdist = cached_download(index, pins.index_project, pins.vllm["0.22.0"].sdist, pins.vllm["0.22.0"].sdist_sha256)
    (OUT / "tests").mkdir()
    with tarfile.open(sdist) as tf:
        member = tf.extractfile("vllm-0.22.0/tests/kernels/attention/test_flash_attn.py")
        assert member is not None
        (OUT / "tests" / "test_flash_attn_v0220.py").write_bytes(member.read())
    if args.fa4_wheel:
        (OUT / "fa4").mkdir()
        shutil.copy(args.fa4_wheel, OUT / "fa4")

    files = sorted(p for p in OUT.rglob("*") if p.is_file())
    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.stat().st_size:>10}  {p.relative_to(OUT)}"
             for p in files]
    (OUT / "MANIFEST").write_text("\n".join(lines) + "\n")
    total = sum(p.stat().st_size for p in files)
    print("\n".join(lines))
    print(f"total {total / 2**20:.1f} MiB (limit 64 MiB)")
    return 0 if total < LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())
