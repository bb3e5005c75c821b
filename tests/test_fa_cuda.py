"""The attention package on its own (VLLM_FORGE_FA_CUDA): flash-attention's own CMakeLists
configured through this project for TORCH_CUDA_ARCH_LIST, and one real FA3 translation unit
compiled for sm_90a through the compiler launcher.

The configure/compile test needs what CI cannot fetch (no GitHub there): a full flash-attention
checkout at the pin with csrc/cutlass (VLLM_FORGE_FA_FULL_SRC) and a Python with a CUDA build of
torch (VLLM_FORGE_CUDA_PYTHON, default: this one). The refusal of an incomplete tree runs anywhere.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_forge.fa4 import cmake_exe
from vllm_forge.pins import load_pins

REPO = Path(__file__).resolve().parents[1]
FULL_SRC = os.environ.get("VLLM_FORGE_FA_FULL_SRC")
CUDA_PYTHON = os.environ.get("VLLM_FORGE_CUDA_PYTHON", sys.executable)


def test_incomplete_checkout_is_refused(tmp_path: Path) -> None:
    fa4_only = tmp_path / "fa"
    (fa4_only / "flash_attn" / "cute").mkdir(parents=True)
    (fa4_only / "flash_attn" / "cute" / "interface.py").write_text("")
    r = subprocess.run([cmake_exe(), "-S", str(REPO), "-B", str(tmp_path / "b"), "-DVLLM_FORGE_FA_CUDA=ON",
                        f"-DVLLM_FLASH_ATTN_SRC_DIR={fa4_only}"], capture_output=True, text=True)
    msg = " ".join(r.stderr.split())  # CMake wraps its messages
    assert r.returncode != 0
    assert "lacks CMakeLists.txt: VLLM_FORGE_FA_CUDA needs a full flash-attention checkout" in msg
    assert load_pins().fa.commit in msg and "git submodule update --init csrc/cutlass" in msg


def _cuda_torch() -> str | None:
    r = subprocess.run([CUDA_PYTHON, "-c", "import torch; print(torch.version.cuda or '')"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return None
    return r.stdout.strip() or None


def cuda_root() -> Path:
    """The toolkit nvcc belongs to (nvcc may be a wrapper script on PATH): nvcc's own TOP."""
    out = subprocess.run(["nvcc", "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                         capture_output=True, text=True).stderr
    top = next(line.split("=", 1)[1] for line in out.splitlines() if line.startswith("#$ TOP="))
    return Path(top).resolve()


def _driver_stub(tmp: Path, root: Path) -> list[str]:
    """CUDA devel installs carry lib64/stubs/libcuda.so (a link-time stand-in for the driver,
    soname libcuda.so.1). Where the toolkit lacks it, make the same kind of stub: every driver API
    entry point of cuda.h (after its versioning macros) as an exported function. It must export them:
    _vllm_fa3_C calls cuTensorMapEncodeTiled directly, and against an empty stub the linker (with
    --as-needed) drops libcuda.so.1 from the module's NEEDED, so the module would not load."""
    if any((root / d / "stubs" / "libcuda.so").exists() for d in ("lib64", "lib")):
        return [f"-DCUDA_TOOLKIT_ROOT_DIR={root}"]
    pre = subprocess.run(["cc", "-E", "-x", "c", f"-I{root / 'include'}", "-"], input="#include <cuda.h>\n",
                         capture_output=True, text=True, check=True).stdout
    names = sorted(set(re.findall(r"\bCUresult\s+(cu[A-Za-z0-9_]+)\s*\(", pre)))
    assert "cuTensorMapEncodeTiled" in names, len(names)
    (tmp / "stub.c").write_text("".join(f"int {n}(void) {{ return 999; }}\n" for n in names))
    stub = tmp / "libcuda.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(stub), str(tmp / "stub.c")],
                   check=True)
    return [f"-DCUDA_TOOLKIT_ROOT_DIR={root}", f"-DCUDA_cuda_driver_LIBRARY={stub}"]


@pytest.mark.skipif(not FULL_SRC, reason="VLLM_FORGE_FA_FULL_SRC (a full flash-attention checkout at the pin, "
                    "with csrc/cutlass) is not set; CI cannot fetch one")
@pytest.mark.skipif(shutil.which("nvcc") is None or shutil.which("ninja") is None, reason="no nvcc or ninja")
def test_standalone_configure_and_fa3_object(tmp_path: Path) -> None:
    if not _cuda_torch():
        pytest.skip(f"{CUDA_PYTHON} has no CUDA build of torch (set VLLM_FORGE_CUDA_PYTHON)")
    build = tmp_path / "build"
    root = cuda_root()
    env = {**os.environ, "CUDACXX": str(root / "bin" / "nvcc")}
    env.pop("TORCH_CUDA_ARCH_LIST", None)
    cfg = subprocess.run([cmake_exe(), "-G", "Ninja", "-S", str(REPO), "-B", str(build), "-DVLLM_FORGE_FA_CUDA=ON",
                          f"-DVLLM_FLASH_ATTN_SRC_DIR={FULL_SRC}", f"-DPython_EXECUTABLE={CUDA_PYTHON}",
                          *_driver_stub(tmp_path, root)], env=env, capture_output=True, text=True)
    assert cfg.returncode == 0, cfg.stdout[-3000:] + cfg.stderr[-3000:]
    for line in ("TORCH_CUDA_ARCH_LIST=9.0a -> CUDA architectures 90a-real", "FA2_ARCHS: 8.0+PTX",
                 "FA3_ARCHS: 9.0a"):
        assert line in cfg.stdout
    ninja = (build / "build.ninja").read_text()
    for target in ("_vllm_fa2_C", "_vllm_fa3_C"):
        assert f"build {target}" in ninja or f"_deps/vllm-flash-attn-build/{target}" in ninja, target
    obj = "_deps/vllm-flash-attn-build/CMakeFiles/_vllm_fa3_C.dir/hopper/flash_prepare_scheduler.cu.o"
    subprocess.run(["ninja", "-C", str(build), obj], env=env, check=True,
                   capture_output=True)
    assert (build / obj).stat().st_size > 0
    # the FA4 component of the standalone package: cute/ under vllm_flash_attn, imports rewritten
    subprocess.run([cmake_exe(), "--install", str(build), "--component", "_vllm_fa4_cutedsl_C", "--prefix",
                    str(tmp_path / "pkg")], check=True, capture_output=True)
    iface = (tmp_path / "pkg" / "vllm_flash_attn" / "cute" / "interface.py").read_text()
    assert "from vllm_flash_attn.cute" in iface and "from flash_attn.cute" not in iface


TRIM = "FP16;FP8;HDIM96;HDIM192;HDIMDIFF64;HDIMDIFF192;SOFTCAP;SPLIT"
TRIMMED_UNITS = [f"flash_fwd_hdim{d}_bf16_{v}_sm90.cu" for d in (128, 256, 64) for v in ("packgqa", "paged")]


@pytest.mark.skipif(not FULL_SRC, reason="VLLM_FORGE_FA_FULL_SRC (a full flash-attention checkout at the pin, "
                    "with csrc/cutlass) is not set; CI cannot fetch one")
@pytest.mark.skipif(shutil.which("nvcc") is None or shutil.which("ninja") is None, reason="no nvcc or ninja")
def test_standalone_trimmed_configure(tmp_path: Path) -> None:
    """The real tree: vLLM's 190 FA3 instantiation units, 6 left by the switches the README's build
    used (bf16, head dims 64/128/256, paged KV), the switches on every FA3 compile line, the
    reproducibility flags on the units and the link."""
    if not _cuda_torch():
        pytest.skip(f"{CUDA_PYTHON} has no CUDA build of torch (set VLLM_FORGE_CUDA_PYTHON)")
    root = cuda_root()
    env = {**os.environ, "CUDACXX": str(root / "bin" / "nvcc")}
    env.pop("TORCH_CUDA_ARCH_LIST", None)
    runs = {}
    for name, extra in (("full", []), ("trim", [f"-DVLLM_FORGE_FA3_DISABLE={TRIM}"])):
        cfg = subprocess.run([cmake_exe(), "-G", "Ninja", "-S", str(REPO), "-B", str(tmp_path / name),
                              "-DVLLM_FORGE_FA_CUDA=ON", f"-DVLLM_FLASH_ATTN_SRC_DIR={FULL_SRC}",
                              f"-DPython_EXECUTABLE={CUDA_PYTHON}", *_driver_stub(tmp_path, root), *extra],
                             env=env, capture_output=True, text=True, check=False)
        assert cfg.returncode == 0, cfg.stdout[-3000:] + cfg.stderr[-3000:]
        runs[name] = " ".join(cfg.stdout.split())
    assert "FA3 kernel units: 190 of 190" in runs["full"]
    assert "FA3 kernel units: 6 of 190" in runs["trim"]
    assert "FA3 kernel units kept: " + " ".join(sorted(TRIMMED_UNITS)) in runs["trim"]
    ninja = (tmp_path / "trim" / "build.ninja").read_text()
    for sw in TRIM.split(";"):
        assert f"-DFLASHATTENTION_DISABLE_{sw} " in ninja, sw
    assert "-frandom-seed=hopper/instantiations/flash_fwd_hdim128_bf16_paged_sm90.cu" in ninja
    assert f"-ffile-prefix-map={FULL_SRC}=/vllm-flash-attn" in ninja
    assert "--discard-all" in ninja and "--build-id=sha1" in ninja
