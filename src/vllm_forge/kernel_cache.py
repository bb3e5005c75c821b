"""`vllm-forge fa4-cache`: the FA4 kernels a model needs, compiled ahead of time on a GPU builder.

The forged wheel's runtime layer compiles every FA4 variant at engine start-up and keeps it in FA4's
own on-disk cache, keyed by `<device key>/<FA4 fingerprint>/` (GPU name + compute capability + torch +
CUDA; FA4 sources + cutlass-dsl + tvm-ffi + Python): another GPU, FA tree or cutlass-dsl never loads
a stale kernel, it misses and compiles. This command fills such a cache for one model shape by
starting vLLM's own engine with dummy weights in the Python where the forged wheel is installed
(`kernel_cache_child.py`), and `vllm-forge docker --fa4-cache DIR` puts it into the image.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ForgeError
from .kernel_cache_child import MANIFEST, kernels

CHILD = Path(__file__).with_name("kernel_cache_child.py")


@dataclass(frozen=True)
class CacheRequest:
    model: str
    out: Path
    python: str | None = None
    layers: int | None = None
    tensor_parallel_size: int = 1
    dtype: str = "auto"
    max_model_len: int | None = None
    max_num_batched_tokens: int | None = None
    block_size: int | None = None
    kv_cache_dtype: str | None = None
    attention_backend: str | None = None
    gpu_memory_utilization: float = 0.9
    trust_remote_code: bool = False


def child_command(req: CacheRequest, error_file: Path) -> list[str]:
    cmd = [req.python or sys.executable, str(CHILD), "--model", req.model, "--out", str(req.out),
           "--error-file", str(error_file), "--tensor-parallel-size", str(req.tensor_parallel_size),
           "--dtype", req.dtype, "--gpu-memory-utilization", str(req.gpu_memory_utilization)]
    for flag, value in (("--layers", req.layers), ("--max-model-len", req.max_model_len),
                        ("--max-num-batched-tokens", req.max_num_batched_tokens),
                        ("--block-size", req.block_size), ("--kv-cache-dtype", req.kv_cache_dtype),
                        ("--attention-backend", req.attention_backend)):
        if value is not None:
            cmd += [flag, str(value)]
    return cmd + (["--trust-remote-code"] if req.trust_remote_code else [])


def produce(req: CacheRequest) -> dict[str, Any]:
    """Fill req.out (created if missing; kernels of earlier runs are kept) and return its manifest."""
    python = req.python or sys.executable
    if req.python and not (shutil.which(req.python) or Path(req.python).is_file()):
        raise ForgeError(f"--python {req.python} does not exist", "give the interpreter of the environment "
                         "where the forged wheel is installed")
    if req.layers is not None and req.layers < 1:
        raise ForgeError(f"--layers {req.layers} is not a layer count", "give a positive number, or leave it out")
    if req.out.exists() and not req.out.is_dir():
        raise ForgeError(f"--out {req.out} is a file", "give a directory")
    existing = next((p for p in [req.out, *req.out.absolute().parents] if p.exists()), Path("/"))
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ForgeError(f"--out {req.out} cannot be written ({existing} is not a writable directory)",
                         "give a writable directory")
    # a failed first run leaves nothing behind (the folders it made); a failed refill keeps the cache
    missing = [p for p in [req.out.absolute(), *req.out.absolute().parents] if not p.exists()]
    try:
        with tempfile.TemporaryDirectory(prefix="vllm-forge-fa4-cache-") as tmp:
            error_file = Path(tmp) / "error.json"
            print(f"vllm-forge: starting vLLM ({python}) on {req.model} with dummy weights to compile its FA4 "
                  f"kernels into {req.out}", file=sys.stderr, flush=True)
            r = subprocess.run(child_command(req, error_file))
            if error_file.is_file():
                err = json.loads(error_file.read_text())
                raise ForgeError(err["what"], err["hint"])
        if r.returncode != 0:
            raise ForgeError(f"vLLM did not start on {req.model} (exit {r.returncode})",
                             "see its log above; a model too large for the GPU takes --layers N")
        return read_manifest(req.out)
    except BaseException:
        if missing:
            shutil.rmtree(missing[-1], ignore_errors=True)
        raise


def read_manifest(cache: Path) -> dict[str, Any]:
    path = cache / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ForgeError(f"{cache} is not an FA4 kernel cache (no {MANIFEST})",
                         "make one with `vllm-forge fa4-cache --model M --out DIR` on a GPU machine") from None
    except (OSError, ValueError) as e:
        raise ForgeError(f"cannot read {path}: {e}", "make the cache again with `vllm-forge fa4-cache`") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("kernels"), dict) or "vllm" not in manifest:
        raise ForgeError(f"{path} is not a vllm-forge FA4 cache manifest", "make the cache again")
    return manifest


def check_cache(cache: Path, forged_version: str) -> dict[str, Any]:
    """The cache belongs to this forged vLLM and every kernel is the one the manifest names."""
    manifest = read_manifest(cache)
    if manifest["vllm"] != forged_version:
        raise ForgeError(f"the FA4 kernel cache {cache} was made with vllm {manifest['vllm']}, the image gets "
                         f"{forged_version}", "run `vllm-forge fa4-cache` with this forged wheel installed")
    found = kernels(cache)
    if found != manifest["kernels"]:
        bad = sorted(set(found.items()) ^ set(manifest["kernels"].items()))
        raise ForgeError(f"the FA4 kernel cache {cache} differs from its manifest ({bad[0][0]} and "
                         f"{len(bad) - 1} more)", "make the cache again with `vllm-forge fa4-cache`")
    return manifest


def stage_cache(cache: Path, dest: Path) -> int:
    """Copy the kernels and the manifest (not FA4's lock files) into a build context; returns the count."""
    n = 0
    for rel in [*kernels(cache), MANIFEST]:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cache / rel, target)
        n += rel != MANIFEST
    return n
