"""Run by `vllm-forge fa4-cache` with the Python that has the forged vLLM installed (it imports
nothing of vllm-forge, only vLLM and the standard library).

It starts vLLM's own engine on the model with dummy weights (`load_format="dummy"`: only the config
is read) and `VLLM_FORGE_FA4_CACHE_DIR` pointing at the output directory: the forged wheel's runtime
layer then compiles every FA4 variant the model's layers will call at start-up and FA4 stores them
under `<out>/<device key>/<FA4 fingerprint>/`. Then it writes `<out>/vllm-forge-fa4-cache.json`:
which forged vLLM made it, for which models, and the sha256 of every kernel.

Errors go to --error-file as {"what": ..., "hint": ...} and exit status 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

MANIFEST = "vllm-forge-fa4-cache.json"
FORMAT = 1
SWITCHES = ("VLLM_FORGE_RUNTIME", "VLLM_FORGE_FA4_CACHE", "VLLM_FORGE_FA4_WARMUP")


class Refusal(Exception):
    def __init__(self, what: str, hint: str) -> None:
        super().__init__(f"{what} -- {hint}")
        self.what, self.hint = what, hint


def layer_overrides(config: Any, layers: int | None) -> dict[str, Any] | None:
    """hf_overrides that keep the first `layers` decoder layers: every attention shape of the model
    is still there as long as each of its layer types is (refused otherwise)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    total = getattr(text, "num_hidden_layers", None)
    if not layers or total is None or layers >= total:
        return None
    over: dict[str, Any] = {"num_hidden_layers": layers}
    types = getattr(text, "layer_types", None)
    if types:
        kept, every = list(types[:layers]), list(types)
        if set(kept) != set(every):
            need = max(every.index(t) for t in set(every)) + 1
            raise Refusal(f"--layers {layers} keeps only the layer types {sorted(set(kept))} of "
                          f"{sorted(set(every))}", f"use --layers {need} or more")
        over["layer_types"] = kept
    return {"text_config": over} if text is not config else over


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def kernels(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): sha256(p) for p in sorted(out.rglob("*.o")) if p.is_file()}


def merge_manifest(old: dict[str, Any] | None, vllm: str, runtime: str, model: dict[str, Any],
                   files: dict[str, str]) -> dict[str, Any]:
    if old is not None and old.get("vllm") != vllm:
        raise Refusal(f"this cache directory holds FA4 kernels of vllm {old.get('vllm')}, not of {vllm}",
                      "give another --out for each forged vLLM")
    models = {m["id"]: m for m in (old or {}).get("models", [])}
    models[model["id"]] = model
    return {"format": FORMAT, "vllm": vllm, "runtime_sha256": runtime,
            "device_keys": sorted({k.split("/", 1)[0] for k in files}),
            "models": [models[k] for k in sorted(models)], "kernels": files}


def run(args: argparse.Namespace) -> None:
    import importlib.util
    from importlib import metadata

    out = Path(args.out).resolve()
    for name in SWITCHES:
        if os.environ.get(name) == "0":
            raise Refusal(f"{name}=0 is set: the runtime layer would not fill the cache", f"unset {name}")
    if importlib.util.find_spec("vllm") is None:
        raise Refusal(f"no vLLM in {sys.executable}", "install the forged wheel there, or give --python")
    runtime = importlib.util.find_spec("vllm._forge_runtime")
    if runtime is None or runtime.origin is None:
        raise Refusal(f"the vLLM in {sys.executable} is not a forged wheel with the runtime layer",
                      "install a wheel from `vllm-forge build` (not --no-runtime)")
    for name in ("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"):
        os.environ.pop(name, None)  # the runtime layer sets both, under the device key
    os.environ["VLLM_FORGE_FA4_CACHE_DIR"] = str(out)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    overrides = layer_overrides(config, args.layers)
    from vllm import LLM

    kw: dict[str, Any] = {"model": args.model, "load_format": "dummy", "skip_tokenizer_init": True,
                          "enforce_eager": True, "dtype": args.dtype,
                          "tensor_parallel_size": args.tensor_parallel_size,
                          "gpu_memory_utilization": args.gpu_memory_utilization,
                          "trust_remote_code": args.trust_remote_code}
    if args.attention_backend:
        kw["attention_config"] = {"backend": args.attention_backend}
    for key in ("max_model_len", "block_size", "max_num_batched_tokens", "kv_cache_dtype"):
        if getattr(args, key) is not None:
            kw[key] = getattr(args, key)
    if overrides:
        kw["hf_overrides"] = overrides
    llm = LLM(**kw)
    cfg = llm.llm_engine.vllm_config
    model = {"id": f"{args.model}|tp{args.tensor_parallel_size}|{cfg.model_config.dtype}|"
                   f"{cfg.cache_config.cache_dtype}|block{cfg.cache_config.block_size}",
             "model": args.model, "layers": args.layers, "tensor_parallel_size": args.tensor_parallel_size,
             "dtype": str(cfg.model_config.dtype), "kv_cache_dtype": str(cfg.cache_config.cache_dtype),
             "block_size": cfg.cache_config.block_size, "attention_backend": args.attention_backend}
    del llm
    path = out / MANIFEST
    old = json.loads(path.read_text()) if path.is_file() else None
    files = kernels(out)
    if not files:
        raise Refusal("the engine started but no FA4 kernel was stored (no layer of the model ran FA4: vLLM "
                      "may have chosen another attention backend, or this GPU is not one FA4 serves)",
                      "give --attention-backend FLASH_ATTN as serving does, and see the vllm-forge: log lines")
    manifest = merge_manifest(old, metadata.version("vllm"), sha256(Path(runtime.origin)), model, files)
    tmp = path.with_name(f".{MANIFEST}.{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    print(f"vllm-forge: FA4 kernel cache {out}: {len(files)} kernel(s) for vllm {manifest['vllm']} "
          f"({', '.join(manifest['device_keys'])})", flush=True)


def main() -> NoReturn:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--error-file", required=True)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-model-len", type=int)
    ap.add_argument("--max-num-batched-tokens", type=int)
    ap.add_argument("--block-size", type=int)
    ap.add_argument("--kv-cache-dtype")
    ap.add_argument("--attention-backend")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--trust-remote-code", action="store_true")
    args = ap.parse_args()
    try:
        run(args)
    except Refusal as e:
        Path(args.error_file).write_text(json.dumps({"what": e.what, "hint": e.hint}))
        sys.exit(2)
    sys.exit(0)


if __name__ == "__main__":
    main()
