"""The FA3 trimming switches (VLLM_FORGE_FA3_DISABLE) and the reproducibility flags
(cmake/reproducible.cmake) on a stand-in flash-attention tree: the same target name
(`_vllm_fa3_C`), the same instantiation file names under hopper/instantiations/, tiny kernels
(an anonymous-namespace __global__ each, so nvcc's generated names are in play). It needs no torch
and no full checkout, so CI runs it (nvcc 13.0 is on its machines); the real tree is
tests/test_fa_cuda.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from vllm_forge.fa4 import cmake_exe

REPO = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc")
NINJA = shutil.which("ninja")

UNITS = [  # a cross-section of the pinned tree's 190 instantiation units
    "flash_fwd_hdim64_bf16_packgqa_sm90.cu", "flash_fwd_hdim64_bf16_paged_sm90.cu",
    "flash_fwd_hdim64_256_bf16_paged_sm90.cu", "flash_fwd_hdim64_512_bf16_packgqa_sm90.cu",
    "flash_fwd_hdim96_bf16_paged_sm90.cu", "flash_fwd_hdim128_bf16_packgqa_sm90.cu",
    "flash_fwd_hdim128_bf16_paged_split_sm90.cu", "flash_fwd_hdim128_fp16_paged_sm90.cu",
    "flash_fwd_hdim128_e4m3_paged_sm90.cu", "flash_fwd_hdim192_128_bf16_paged_sm90.cu",
    "flash_fwd_hdim192_bf16_split_softcap_sm90.cu", "flash_fwd_hdim256_bf16_paged_softcap_sm90.cu",
    "flash_fwd_hdim256_bf16_paged_sm90.cu",
]
KEPT = {"flash_fwd_hdim64_bf16_packgqa_sm90.cu", "flash_fwd_hdim64_bf16_paged_sm90.cu",
        "flash_fwd_hdim128_bf16_packgqa_sm90.cu", "flash_fwd_hdim256_bf16_paged_sm90.cu"}
TRIM = "FP16;FP8;HDIM96;HDIM192;HDIMDIFF64;HDIMDIFF192;SOFTCAP;SPLIT"

FAKE_CMAKE = """cmake_minimum_required(VERSION 3.26)
project(fake_flash_attn LANGUAGES CXX CUDA)
file(GLOB FA3_GEN_SRCS "hopper/instantiations/flash_fwd_*_sm90.cu")
add_library(_vllm_fa3_C MODULE hopper/flash_api.cpp ${FA3_GEN_SRCS})
set_target_properties(_vllm_fa3_C PROPERTIES CUDA_ARCHITECTURES "${VLLM_FORGE_CUDA_ARCHITECTURES}" PREFIX "")
target_compile_definitions(_vllm_fa3_C PRIVATE FLASHATTENTION_DISABLE_BACKWARD)
install(TARGETS _vllm_fa3_C LIBRARY DESTINATION vllm_flash_attn COMPONENT _vllm_fa3_C)
"""


def fake_tree(root: Path) -> Path:
    for need in ("csrc/flash_attn/flash_api.cpp", "csrc/cutlass/include/cute/tensor.hpp",
                 "flash_attn/cute/interface.py", "vllm_flash_attn/__init__.py"):
        (root / need).parent.mkdir(parents=True, exist_ok=True)
        (root / need).write_text("")
    (root / "CMakeLists.txt").write_text(FAKE_CMAKE)
    (root / "hopper" / "instantiations").mkdir(parents=True)
    (root / "hopper" / "flash_api.cpp").write_text("int fake_api() { return 0; }\n")
    for i, name in enumerate(UNITS):
        (root / "hopper" / "instantiations" / name).write_text(
            f"namespace {{ __global__ void k(float* x) {{ x[threadIdx.x] *= {i + 2}.f; }} }}\n"
            f"void launch_{i}(float* x) {{ k<<<1, 32>>>(x); }}\n")
    return root


def configure(src: Path, build: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ}
    env.pop("TORCH_CUDA_ARCH_LIST", None)
    env.pop("VLLM_FLASH_ATTN_SRC_DIR", None)
    gen = ["-G", "Ninja"] if NINJA else []
    return subprocess.run([cmake_exe(), *gen, "-S", str(REPO), "-B", str(build), "-DVLLM_FORGE_FA_CUDA=ON",
                           f"-DVLLM_FLASH_ATTN_SRC_DIR={src}", "-DVLLM_FORGE_COMPILER_LAUNCHER=", *args],
                          env=env, capture_output=True, text=True, check=False)


pytestmark = pytest.mark.skipif(NVCC is None or NINJA is None, reason="no nvcc or ninja (the stand-in tree is CUDA)")


def test_trim_switches_reach_the_target(tmp_path: Path) -> None:
    src = fake_tree(tmp_path / "fa")
    full = configure(src, tmp_path / "full")
    assert full.returncode == 0, full.stdout[-2000:] + full.stderr[-2000:]
    assert f"FA3 kernel units: {len(UNITS)} of {len(UNITS)}" in full.stdout
    assert "FA3 trimmed" not in full.stdout
    cfg = configure(src, tmp_path / "b", f"-DVLLM_FORGE_FA3_DISABLE={TRIM}")
    assert cfg.returncode == 0, cfg.stdout[-2000:] + cfg.stderr[-2000:]
    out = " ".join(cfg.stdout.split())
    assert f"FA3 kernel units: {len(KEPT)} of {len(UNITS)}" in out
    assert "FA3 kernel units kept: " + " ".join(sorted(KEPT)) in out
    ninja = (tmp_path / "b" / "build.ninja").read_text()
    compiled = {n for n in UNITS if f"hopper/instantiations/{n}.o" in ninja}
    assert compiled == KEPT
    for sw in TRIM.split(";"):
        assert f"-DFLASHATTENTION_DISABLE_{sw} " in ninja, sw
    assert "-DFLASHATTENTION_DISABLE_BACKWARD" in ninja  # the fetched project's own definitions stay


def test_unknown_switch_is_refused(tmp_path: Path) -> None:
    cfg = configure(fake_tree(tmp_path / "fa"), tmp_path / "b", "-DVLLM_FORGE_FA3_DISABLE=FP16;BF16")
    assert cfg.returncode != 0
    msg = " ".join(cfg.stderr.split())
    assert "VLLM_FORGE_FA3_DISABLE: unknown switch 'BF16'" in msg and "HDIMDIFF192" in msg


def test_all_units_dropped_is_refused(tmp_path: Path) -> None:
    cfg = configure(fake_tree(tmp_path / "fa"), tmp_path / "b",
                    "-DVLLM_FORGE_FA3_DISABLE=HDIM64;HDIM96;HDIM128;HDIM192;HDIM256")
    assert cfg.returncode != 0
    assert "leaves no FA3 kernel unit" in " ".join(cfg.stderr.split())


def _build(src: Path, build: Path, *args: str) -> bytes:
    cfg = configure(src, build, f"-DVLLM_FORGE_FA3_DISABLE={TRIM}", *args)
    assert cfg.returncode == 0, cfg.stdout[-2000:] + cfg.stderr[-2000:]
    subprocess.run([cmake_exe(), "--build", str(build), "--target", "_vllm_fa3_C"], check=True, capture_output=True)
    return next(build.rglob("_vllm_fa3_C.so")).read_bytes()


def test_reproducible_flags_make_identical_modules(tmp_path: Path) -> None:
    """Two clean builds (different build directories, plain nvcc): identical modules with the flags;
    without them they differ (nvcc's tmpxft_<pid>_... intermediate names end up in .symtab)."""
    src = fake_tree(tmp_path / "fa")
    a = _build(src, tmp_path / "a")
    ninja = (tmp_path / "a" / "build.ninja").read_text()
    assert "-frandom-seed=hopper/instantiations/flash_fwd_hdim64_bf16_paged_sm90.cu" in ninja
    assert f"-ffile-prefix-map={src}=/vllm-flash-attn" in ninja and "--discard-all" in ninja
    b = _build(src, tmp_path / "b")
    assert a == b
    assert b"tmpxft_" not in a
    c = _build(src, tmp_path / "c", "-DVLLM_FORGE_REPRODUCIBLE=OFF")
    d = _build(src, tmp_path / "d", "-DVLLM_FORGE_REPRODUCIBLE=OFF")
    assert b"tmpxft_" in c and c != d
