#!/usr/bin/env python3
"""Compile a release's forged FA4 (its FA pin + our series) for SM90 on a machine without a GPU.

  python scripts/fa4_compile_check.py --vllm 0.22.1 [--runtime DIR] [--case 512:64:causal ...]

What the GPU machine found the hard way once (cutlass-dsl >= 4.6 has no `cute.make_fragment`, an
AttributeError at the first call) shows up here: FA4 JIT-compiles through the CuTe DSL, and the DSL
compiles for a named architecture without a device (FLASH_ATTENTION_ARCH / CUTE_DSL_ARCH = sm_90a, the
inputs as torch fake tensors). Each case is one `_flash_attn_fwd` call as vLLM makes it: varlen q,
paged KV, 32 q / 4 kv heads, bf16 (head dim, page size, causal or not). cutlass-dsl 4.4.2 (the
runtime of 0.20.x-0.21.0) still wants a CUDA driver to compile; from 4.5 on none is needed.

The tree: the release's FA4 sources as `build` ships them (`get_fa4_sources`, tree hash checked, the
pin's series applied), as the package `fa4check` (imports rewritten as vLLM's CMake rewrites them).
The runtime: the exact packages of the series' GPU validation record (`validation.runtime` in
patches/flash-attention/manifest.json), installed with pip into DIR (default: the download cache,
fa4-runtime/<sha256 of the list>); quack's autotuner is left out (it imports triton, which a compile
never uses). Exit status 1 if a case does not compile.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from functools import cache
from pathlib import Path


PKG = "fa4check"
CASES = ["512:64:causal", "512:64:full", "512:16:causal", "256:64:causal"]


def child(cases: list[str]) -> int:
    if "triton" not in sys.modules:
        try:
            import triton  # noqa: F401
        except ImportError:  # quack.autotuner imports triton for benchmarking only
            stub = types.ModuleType("quack.autotuner")
            stub.autotune = lambda *a, **k: (lambda f: f)  # type: ignore[attr-defined]
            stub.AutotuneConfig = lambda *a, **k: None  # type: ignore[attr-defined]
            sys.modules["quack.autotuner"] = stub
    import importlib

    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    interface = importlib.import_module(f"{PKG}.vllm_flash_attn.cute.interface")
    bad = 0
    for case in cases:
        hd, page, mask = case.split(":")
        head_dim, block = int(hd), int(page)
        t0 = time.monotonic()
        try:
            with FakeTensorMode():
                q = torch.empty(8192, 32, head_dim, dtype=torch.bfloat16, device="cuda")
                k = torch.empty(2 * 4096 // block + 8, block, 4, head_dim, dtype=torch.bfloat16, device="cuda")
                cu = torch.empty(3, dtype=torch.int32, device="cuda")
                used = torch.empty(2, dtype=torch.int32, device="cuda")
                table = torch.empty(2, 4096 // block, dtype=torch.int32, device="cuda")
                interface._flash_attn_fwd(q, k, torch.empty_like(k), cu_seqlens_q=cu, seqused_k=used,
                                          max_seqlen_q=4096, max_seqlen_k=4096, page_table=table,
                                          causal=mask == "causal", softmax_scale=head_dim ** -0.5,
                                          out=torch.empty_like(q))
            print(f"ok   {case}: compiled for sm_90a in {time.monotonic() - t0:.1f} s", flush=True)
        except Exception as e:  # noqa: BLE001 - report every case, then fail
            bad += 1
            print(f"FAIL {case}: {type(e).__name__}: {str(e)[:500]}", flush=True)
    return 1 if bad else 0


@cache
def release_tree(version: str) -> tuple[dict[str, bytes], list[str], str]:
    """(rewritten + patched cute files, the validation record's runtime pins, series dir name)."""
    from vllm_forge.fa4 import fa_target, get_fa4_sources
    from vllm_forge.fetch import Index
    from vllm_forge.pins import load_pins
    from vllm_forge.series import series_for

    pins = load_pins()
    vpin = pins.for_version(version)
    target = fa_target(pins, vpin)
    series = series_for(target.cute_tree_sha256)
    if series is None or not series.validation.get("runtime"):
        sys.exit(f"vllm-forge: error: {version}: no validated series for its FA pin -- nothing to check")
    with tempfile.TemporaryDirectory() as tmp:
        src = get_fa4_sources(target, Path(tmp), cache(lambda: Index()), pins.index_project, patch_dir=series.dir)
    return dict(src.files), list(series.validation["runtime"]), series.dir.name


def install_runtime(specs: list[str], dest: Path | None) -> Path:
    if dest is None:
        from vllm_forge.fetch import cache_dir

        dest = cache_dir() / "fa4-runtime" / hashlib.sha256("\n".join(sorted(specs)).encode()).hexdigest()[:16]
    if not (dest / ".complete").is_file():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--only-binary=:all:",
                        "--target", str(dest), "--upgrade", *specs], check=True)
        (dest / ".complete").write_text("\n".join(specs) + "\n")
    return dest


def check(version: str, cases: list[str], runtime: Path | None = None,
          edit: Callable[[dict[str, bytes]], dict[str, bytes]] | None = None,
          specs: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Compile the cases in a child process; edit: a change of the files first (tests); specs: another
    runtime than the validation record's (e.g. a release's own, where its tree was validated with
    the newest release's)."""
    files, recorded, series = release_tree(version)
    specs = specs or recorded
    if edit is not None:
        files = edit(dict(files))
    rt = install_runtime(specs, runtime)
    with tempfile.TemporaryDirectory() as tmp:
        from vllm_forge.gpu.trees import runtime_path, write_renamed

        root = write_renamed({f"cute/{rel}": data for rel, data in files.items()}, Path(tmp), PKG) / PKG / "vllm_flash_attn"
        for init in (root.parent / "__init__.py", root / "__init__.py"):
            init.write_text("")
        env = {**os.environ, "FLASH_ATTENTION_ARCH": "sm_90a", "CUTE_DSL_ARCH": "sm_90a",
               "PYTHONPATH": os.pathsep.join([tmp, *runtime_path(rt)])}
        r = subprocess.run([sys.executable, __file__, "--child", ",".join(cases)], env=env, capture_output=True,
                           text=True, check=False, timeout=900)
    r.stdout = f"vLLM {version}, series {series}, runtime {' '.join(specs)}\n" + r.stdout
    return r


def main() -> int:
    if sys.argv[1:2] == ["--child"]:
        return child(sys.argv[2].split(","))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm", required=True, help="release (its FA pin's validated series)")
    ap.add_argument("--runtime", type=Path, help="pip --target directory for the FA4 runtime")
    ap.add_argument("--case", action="append", help=f"HEAD:PAGE:causal|full (default: {' '.join(CASES)})")
    ap.add_argument("--runtime-specs", help="space-separated name==version list instead of the record's")
    args = ap.parse_args()
    r = check(args.vllm, args.case or CASES, args.runtime,
              specs=args.runtime_specs.split() if args.runtime_specs else None)
    print(r.stdout, end="")
    if r.returncode != 0:
        print(r.stderr[-3000:], file=sys.stderr)
    return r.returncode


if __name__ == "__main__":
    sys.exit(main())
