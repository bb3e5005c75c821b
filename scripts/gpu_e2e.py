#!/usr/bin/env python3
"""End to end through vLLM's own engine on the GPU machine: a Gemma-4-shaped model with random
weights, stock vLLM against the forged wheel of the same release, each configuration in its own
process, same prompts (docs/e2e.md has the transfer, the command and one run's numbers).

  python3 scripts/gpu_carry.py recv .device/e2e/batchNN /tmp/e2e/carry     (each carry batch, in order)
  python3 scripts/gpu_e2e.py setup [--root /tmp/e2e]     (stock/ and forged/ trees, site/ of dependencies)
  python3 scripts/gpu_e2e.py run [--root /tmp/e2e] [--only NAME,...] [--layers 6] [--profile]
        (`prebuilt` in --only: `vllm-forge fa4-cache` fills a cache of its own for the configurations
        after it that name it; `forged-keymiss` runs on it with one more file in the FA4 tree)
  python3 scripts/gpu_e2e.py report RESULT.json...       (tables from saved results)

Results, logs and the tables go to $OUT.

The checkpoint: transformers' Gemma4TextConfig with Gemma-4-31B's attention and MLP shapes
(scripts/data/gemma4-31b-shape.json), few layers in the model's own 5:1 sliding:global pattern, a
small vocabulary; random bf16 weights (seeded) written as safetensors once and loaded by every
configuration. Prompts are token ids (no tokenizer).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = Path(os.environ.get("OUT", "out"))
SHAPE = HERE / "data" / "gemma4-31b-shape.json"

PREFILL = (32, 8192)      # prompts x tokens, 1 output token
DECODE = (64, 1024, 256)  # prompts x tokens, output tokens
TTFT_LEN = 8192
MAX_BATCHED = 16384       # max_num_batched_tokens of every engine (and of the fa4-cache run)
GPU_MEMORY = 0.85         # gpu_memory_utilization, likewise
GREEDY_N = 8              # prompts of the decode set whose tokens/logprobs are compared

# name -> (tree, attention backend, block size or None for the default, extra environment). In the
# environment, E2E_WORKLOADS limits what the child runs (default: all) and E2E_CACHE=prebuilt points
# the runtime layer at the cache `vllm-forge fa4-cache` made.
CONFIGS: dict[str, tuple[str, str, int | None, dict[str, str]]] = {
    "stock-default": ("stock", "FLASH_ATTN", None, {}),
    "forged-b16": ("forged", "FLASH_ATTN", 16, {}),
    "stock-b64": ("stock", "FLASH_ATTN", 64, {}),
    "forged-b64": ("forged", "FLASH_ATTN", 64, {}),
    "forged-default": ("forged", "FLASH_ATTN", None, {}),           # cold FA4 kernel cache
    "forged-default-cached": ("forged", "FLASH_ATTN", None, {}),    # same cache, now warm
    "forged-default-noruntime": ("forged", "FLASH_ATTN", None, {"VLLM_FORGE_RUNTIME": "0"}),
    # the first request without the serving warm-up, profiled (cProfile) against a warm one
    "forged-nowarmup": ("forged", "FLASH_ATTN", None, {"VLLM_FORGE_SERVING_WARMUP": "0",
                                                       "E2E_WORKLOADS": "ttft,firstprofile"}),
    # vLLM's block size kept: head-512 layers on 32-token pages, same kernels otherwise
    "forged-nopage64": ("forged", "FLASH_ATTN", None, {"VLLM_FORGE_FA4_PAGE64": "0",
                                                       "E2E_WORKLOADS": "ttft,prefill,profile"}),
    # on the cache `vllm-forge fa4-cache` made (run `prebuilt` first)
    "forged-prebuilt": ("forged", "FLASH_ATTN", None, {"E2E_CACHE": "prebuilt", "E2E_WORKLOADS": "ttft,prefill"}),
    # same cache, one more .py file in the FA4 tree: FA4's fingerprint changes, every kernel misses
    "forged-keymiss": ("forged", "FLASH_ATTN", None, {"E2E_CACHE": "prebuilt", "E2E_WORKLOADS": "ttft"}),
    "triton": ("stock", "TRITON_ATTN", None, {}),
}


# ------------------------------------------------------------------ checkpoint
def make_checkpoint(dest: Path, layers: int, vocab: int, device: str = "cuda") -> dict:
    import torch
    from safetensors.torch import save_file
    from transformers import Gemma4TextConfig, Gemma4ForCausalLM

    shape = json.loads(SHAPE.read_text())
    kw = {k: v for k, v in shape.items() if not k.startswith("_")}
    pattern = kw.pop("sliding_window_pattern")
    # untied: with random weights, tied embeddings (and Gemma's sqrt(hidden) embedding scale) make the
    # model copy its last input token with probability ~1, whatever attention computes
    kw["tie_word_embeddings"] = False
    kw["layer_types"] = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)]
    cfg = Gemma4TextConfig(num_hidden_layers=layers, vocab_size=vocab, vocab_size_per_layer_input=vocab,
                           torch_dtype="bfloat16", architectures=["Gemma4ForCausalLM"], **kw)
    with torch.device("meta"):
        model = Gemma4ForCausalLM(cfg)
    g = torch.Generator(device=device).manual_seed(1234)
    tensors = {}
    for name, p in model.state_dict().items():
        if p.dim() < 2:  # norm weights (Gemma-4 multiplies by w, initialised to 1), layer scalars
            t = torch.ones(p.shape, dtype=torch.bfloat16, device=device)
        else:
            t = torch.empty(p.shape, dtype=torch.bfloat16, device=device).normal_(0, 0.02, generator=g)
        tensors[name] = t.cpu()
    dest.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(dest)
    return {"params": sum(t.numel() for t in tensors.values()), "layer_types": kw["layer_types"],
            "config": json.loads((dest / "config.json").read_text())}


def hf_reference(model: Path, vocab: int) -> None:
    """transformers' own Gemma-4 on the same checkpoint: the first greedy token (and its logprob) of
    the first GREEDY_N decode prompts, as a reference for what vLLM serves."""
    import torch
    from transformers import Gemma4ForCausalLM
    m = Gemma4ForCausalLM.from_pretrained(model, dtype=torch.bfloat16).cuda().eval()
    rows = []
    with torch.no_grad():
        for ids in _prompts(DECODE[0], DECODE[1], vocab, seed=13)[:GREEDY_N]:
            logits = m(torch.tensor([ids], device="cuda")).logits[0, -1].float()
            lp = torch.log_softmax(logits, -1)
            tok = int(lp.argmax())
            rows.append({"token": tok, "logprob": float(lp[tok]), "top2_gap": float(lp.topk(2).values.diff().abs())})
    (OUT / "e2e_hf.json").write_text(json.dumps(rows, indent=1))
    print(f"transformers reference: first tokens {[r['token'] for r in rows]}", flush=True)
    del m
    torch.cuda.empty_cache()


# ------------------------------------------------------------------ one configuration (child)
def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import random
    r = random.Random(seed)
    return [[r.randrange(16, vocab) for _ in range(length)] for _ in range(n)]


def _layers(llm) -> dict:
    """What vLLM really used per attention layer: backend, FA version, page size of its KV cache."""
    ctx = llm.llm_engine.vllm_config.compilation_config.static_forward_context
    out = {}
    for name, layer in ctx.items():
        impl = getattr(layer, "impl", None)
        kv = getattr(layer, "kv_cache", None)
        kv = kv[0] if isinstance(kv, (list, tuple)) and kv else kv
        out[name] = {"impl": type(impl).__name__, "head_size": getattr(impl, "head_size", None),
                     "fa_version": getattr(impl, "vllm_flash_attn_version", None),
                     "kv_cache_shape": list(kv.shape) if kv is not None and hasattr(kv, "shape") else None}
    return out


def _attention_share(llm, prompts, sp) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        llm.generate(prompts, sp, use_tqdm=False)
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            rows.append((e.key, t, e.count))
    rows.sort(key=lambda r: -r[1])
    total = sum(t for _, t, _ in rows)
    def is_attn(k: str) -> bool:
        kl = k.lower()
        return "flash" in kl or "fmha" in kl or "attn" in kl or "attention" in kl
    attn = sum(t for k, t, _ in rows if is_attn(k))
    return {"kernel_time_ms": total / 1e3, "attention_ms": attn / 1e3, "attention_share": attn / total if total else 0,
            "top": [{"kernel": k[:160], "ms": t / 1e3, "calls": c, "attention": is_attn(k)} for k, t, c in rows[:15]]}


def _profiled(fn) -> dict:
    """fn() under cProfile: the functions with the most cumulative time (what a first request pays)."""
    import cProfile
    import pstats
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    stats = pstats.Stats(prof).stats.items()  # type: ignore[attr-defined]

    def rows(col: int, n: int) -> list[dict]:
        return [{"fn": f"{'/'.join(Path(f).parts[-2:])}:{line}({name})", "calls": v[1], "own_s": round(v[2], 4),
                 "cum_s": round(v[3], 4)} for (f, line, name), v in sorted(stats, key=lambda kv: -kv[1][col])[:n]]
    return {"by_cum": rows(3, 40), "by_own": rows(2, 25)}  # type: ignore[return-value]


def child(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    work = set((os.environ.get("E2E_WORKLOADS") or "ttft,prefill,decode,profile").split(","))
    tree, backend, block, _ = CONFIGS[args.name]
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    t_import = time.perf_counter() - t_start
    vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    kw = dict(model=args.model, skip_tokenizer_init=True, dtype="bfloat16", max_model_len=TTFT_LEN + 256,
              gpu_memory_utilization=GPU_MEMORY, enable_prefix_caching=False, max_num_seqs=64,
              max_num_batched_tokens=MAX_BATCHED, seed=0, attention_config={"backend": backend})
    if block is not None:
        kw["block_size"] = block
    t0 = time.perf_counter()
    llm = LLM(**kw)
    engine_s = time.perf_counter() - t0
    res: dict = {"name": args.name, "tree": tree, "backend": backend, "block_size_arg": block,
                 "import_s": t_import, "engine_start_s": engine_s}
    cfg = llm.llm_engine.vllm_config
    res["block_size"] = cfg.cache_config.block_size
    res["layers"] = _layers(llm)
    import vllm
    res["vllm"] = vllm.__version__
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    P = lambda ps: [TokensPrompt(prompt_token_ids=p) for p in ps]  # noqa: E731
    def kernel_files() -> int:  # FA4 kernels in the on-disk cache the runtime layer set up
        d = os.environ.get("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR")
        return sum(1 for _ in Path(d).rglob("*.o")) if d and Path(d).is_dir() else -1
    res["fa4_cache_dir"] = os.environ.get("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR")
    res["fa4_kernels_after_start"] = kernel_files()
    # first request after start-up, then a warm one of the same shape (other tokens); with
    # firstprofile both run under cProfile (their times then include its overhead)
    first, warm = _prompts(2, TTFT_LEN, vocab, seed=7)
    for key, prompt in (("first", first), ("warm", warm)):
        t = time.perf_counter()
        if "firstprofile" in work:
            res[f"cprofile_{key}"] = _profiled(lambda: llm.generate(P([prompt]), one, use_tqdm=False))
        else:
            llm.generate(P([prompt]), one, use_tqdm=False)
        res[f"ttft_{key}_s"] = time.perf_counter() - t
    res["start_to_first_token_s"] = time.perf_counter() - t_start - res["ttft_warm_s"]
    res["fa4_kernels_after_first_requests"] = kernel_files()
    # three more warm requests: the spread a 10% first-request goal is read against
    res["ttft_warm_more_s"] = []
    for prompt in _prompts(3, TTFT_LEN, vocab, seed=8):
        t = time.perf_counter(); llm.generate(P([prompt]), one, use_tqdm=False)
        res["ttft_warm_more_s"].append(time.perf_counter() - t)
    pre = P(_prompts(*PREFILL, vocab, seed=11))
    if "prefill" in work:
        llm.generate(pre[:2], one, use_tqdm=False)
        times = []
        for _ in range(2):
            t = time.perf_counter(); llm.generate(pre, one, use_tqdm=False); times.append(time.perf_counter() - t)
        res["prefill_s"] = min(times)
        res["prefill_tok_s"] = PREFILL[0] * PREFILL[1] / min(times)
    if "decode" in work:
        # decode-heavy: decode time = (n+1 output tokens) - (1 output token), same prompts
        n, length, out_tokens = DECODE
        dec = P(_prompts(n, length, vocab, seed=13))
        greedy = SamplingParams(max_tokens=out_tokens + 1, temperature=0.0, ignore_eos=True, logprobs=1)
        t1s, tns = [], []
        for _ in range(2):  # best of two: decode steps are short and the host is shared
            t = time.perf_counter(); llm.generate(dec, one, use_tqdm=False); t1s.append(time.perf_counter() - t)
            t = time.perf_counter(); outs = llm.generate(dec, greedy, use_tqdm=False); tns.append(time.perf_counter() - t)
        t1, tn = min(t1s), min(tns)
        res["decode_s"] = tn - t1
        res["decode_tok_s"] = n * out_tokens / (tn - t1)
        res["greedy"] = [{"tokens": list(o.outputs[0].token_ids),
                          "logprobs": [lp[tok].logprob for lp, tok in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]}
                         for o in outs[:GREEDY_N]]
    if args.profile and "profile" in work:
        res["profile"] = _attention_share(llm, pre[:4], one)
    (OUT / f"e2e_{args.name}.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k not in ("greedy", "layers", "profile") and
                      not k.startswith("cprofile")}), flush=True)
    return 0


# ------------------------------------------------------------------ setup (from the carried files)
def _extract_wheel(whl: Path, dest: Path) -> None:
    """Unpack a wheel as an installer would (purelib/platlib of .data into the root; exec bits
    kept); wheels share top-level folders (nvidia_cutlass_dsl, opentelemetry), which pip --target
    would skip."""
    import zipfile
    with zipfile.ZipFile(whl) as zf:
        for info in zf.infolist():
            name = info.filename
            if ".data/" in name.split("/", 1)[0] + "/":
                parts = name.split("/", 2)
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue
                name = parts[2]
            if name.endswith("/"):
                continue
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(info))
            mode = (info.external_attr >> 16) & 0o777
            if mode & 0o111:
                target.chmod(mode)


def setup(args: argparse.Namespace) -> int:
    import shutil
    import zipfile
    root, files = Path(args.root), Path(args.root) / "carry" / "files"
    for d in ("stock", "forged", "site"):
        shutil.rmtree(root / d, ignore_errors=True)
    t = time.perf_counter()
    _extract_wheel(files / "stock.whl", root / "stock")
    subprocess.run(["cp", "-al", str(root / "stock"), str(root / "forged")], check=True)
    with zipfile.ZipFile(files / "forged-delta.zip") as zf:
        for di in (root / "forged").glob("vllm-*.dist-info"):
            shutil.rmtree(di)
        for n in zf.read("REMOVED").decode().split():
            (root / "forged" / n).unlink(missing_ok=True)
        for n in zf.namelist():
            if n != "REMOVED":
                target = root / "forged" / n
                target.unlink(missing_ok=True)  # a hard link into stock/: replace, never write through
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(zf.read(n))
    # the [cu13] libraries after libs-base/core: same paths, theirs win
    for whl in sorted(files.glob("*.whl"), key=lambda p: ("libs_cu1" in p.name, p.name)):
        if whl.name != "stock.whl":
            _extract_wheel(whl, root / "site")
    print(f"setup: stock, forged and site under {root} in {time.perf_counter() - t:.0f} s", flush=True)
    return 0


def site_path(site: Path) -> list[str]:
    """site/ plus what its .pth files add (cutlass-dsl's dsl_packages / python_packages)."""
    paths = [str(site)]
    for pth in sorted(site.glob("*.pth")):
        for ln in pth.read_text().splitlines():
            if ln and not ln.startswith(("#", "import")) and (site / ln).is_dir():
                paths.append(str((site / ln).resolve()))
    return paths


# ------------------------------------------------------------------ orchestration
def run(args: argparse.Namespace) -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    root = Path(args.root)
    args.stock, args.forged, args.work = str(root / "stock"), str(root / "forged"), str(root / "work")
    site = site_path(root / "site")
    model = Path(args.work) / "model"
    if not (model / "model.safetensors").is_file():
        t = time.perf_counter()
        sys.path[:0] = site  # transformers of the release's days (Gemma4TextConfig)
        info = make_checkpoint(model, args.layers, args.vocab)
        info["make_s"] = time.perf_counter() - t
        (OUT / "e2e_model.json").write_text(json.dumps(info, indent=1))
        print(f"checkpoint: {info['params'] / 1e9:.2f} B params, {info['layer_types']}, {info['make_s']:.0f} s", flush=True)
    if not (OUT / "e2e_hf.json").is_file():
        sys.path[:0] = site
        hf_reference(model, args.vocab)
    cache = Path(args.work) / "fa4-cache"
    prebuilt = Path(args.work) / "fa4-cache-prebuilt"
    names = args.only.split(",") if args.only else list(CONFIGS)
    rc = 0
    for name in names:
        if name == "prebuilt":
            rc |= make_prebuilt(args, model, prebuilt, site)
            continue
        tree, _, _, extra = CONFIGS[name]
        tree_dir = getattr(args, tree)  # args.stock or args.forged
        env = {**_engine_env(args, tree, site), "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
               "VLLM_FORGE_FA4_CACHE_DIR": str(prebuilt if extra.get("E2E_CACHE") == "prebuilt" else cache),
               **({"E2E_WORKLOADS": args.workloads} if args.workloads else {}), **extra}
        if name == "forged-default":
            subprocess.run(["rm", "-rf", str(cache)])
        # forged-keymiss: one more .py in FA4's cute/ changes FA4's source fingerprint (its cache key)
        extra_src = Path(tree_dir) / "vllm" / "vllm_flash_attn" / "cute" / "_vllm_forge_keytest.py"
        if name == "forged-keymiss":
            extra_src.write_text("# vllm-forge e2e: a changed FA4 tree must not load the cached kernels\n")
        cmd = [sys.executable, __file__, "child", name, "--model", str(model)] + (["--profile"] if args.profile else [])
        print(f"== {name}", flush=True)
        t = time.perf_counter()
        try:
            with open(OUT / f"e2e_{name}.log", "w") as log:
                r = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout)
        finally:
            extra_src.unlink(missing_ok=True)
        rc |= _tail(name, r.returncode, time.perf_counter() - t)
    report([p for p in sorted(OUT.glob("e2e_*.json"))
            if p.name not in ("e2e_model.json", "e2e_hf.json", "e2e_prebuilt_manifest.json")])
    return rc


def _engine_env(args: argparse.Namespace, tree: str, paths: list[str]) -> dict[str, str]:
    """What every vLLM process of the run gets: the tree first on the path, its own compile cache."""
    tree_dir = getattr(args, tree)  # args.stock or args.forged
    return {**os.environ, "PYTHONPATH": os.pathsep.join([tree_dir, *paths]),
            # flashinfer is not carried (greedy sampling never needs its top-k/top-p kernels)
            "VLLM_USE_FLASHINFER_SAMPLER": "0",
            "VLLM_CACHE_ROOT": str(Path(args.work) / f"vllm-cache-{tree}")}


def _tail(name: str, returncode: int, seconds: float) -> int:
    tail = (OUT / f"e2e_{name}.log").read_text().splitlines()
    print(f"   rc={returncode} {seconds:.0f} s; " + (tail[-1][:600] if tail else ""), flush=True)
    if returncode:
        print("\n".join(tail[-25:]), flush=True)
        return 1
    for ln in tail:
        if "vllm-forge:" in ln or "jit_monitor.py" in ln and "activated" not in ln:
            print("   " + ln[-300:], flush=True)
    return 0


def make_prebuilt(args: argparse.Namespace, model: Path, prebuilt: Path, site: list[str]) -> int:
    """`vllm-forge fa4-cache` (this checkout's CLI) with the forged tree: a fresh cache of its own."""
    subprocess.run(["rm", "-rf", str(prebuilt)])
    env = _engine_env(args, "forged", [*site, str(HERE.parent / "src")])
    cmd = [sys.executable, "-m", "vllm_forge.cli", "fa4-cache", "--model", str(model), "--out", str(prebuilt),
           "--max-model-len", str(TTFT_LEN + 256), "--max-num-batched-tokens", str(MAX_BATCHED),
           "--gpu-memory-utilization", str(GPU_MEMORY), "--attention-backend", "FLASH_ATTN"]
    print("== prebuilt: " + " ".join(cmd[1:]), flush=True)
    t = time.perf_counter()
    with open(OUT / "e2e_prebuilt.log", "w") as log:
        r = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout)
    manifest = prebuilt / "vllm-forge-fa4-cache.json"
    if manifest.is_file():
        (OUT / "e2e_prebuilt_manifest.json").write_text(manifest.read_text())
    return _tail("prebuilt", r.returncode, time.perf_counter() - t)


def _cmp(a: dict, b: dict) -> tuple[float, float]:
    same = total = 0
    maxdiff = 0.0
    for x, y in zip(a["greedy"], b["greedy"]):
        for i, (tx, ty) in enumerate(zip(x["tokens"], y["tokens"])):
            total += 1
            if tx != ty:
                break  # after the first difference the contexts differ
            same += 1
            maxdiff = max(maxdiff, abs(x["logprobs"][i] - y["logprobs"][i]))
    ntok = sum(len(x["tokens"]) for x in a["greedy"])
    return same / ntok if ntok else 0.0, maxdiff


def report(paths: list[Path]) -> None:
    rs = {json.loads(p.read_text())["name"]: json.loads(p.read_text()) for p in paths}
    if not rs:
        return
    lines = ["| config | block size (arg → used) | head-512 pages | engine start s | FA4 kernels on disk after start"
             " → after 2 requests | first TTFT s | warm TTFT s (median of 4) | first / warm | prefill tok/s | "
             "decode tok/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rs.items():
        pages = sorted({lay["kv_cache_shape"][2] for lay in r["layers"].values()
                        if lay.get("head_size", 0) and lay["head_size"] > 256 and lay["kv_cache_shape"]})
        warm = sorted([r["ttft_warm_s"], *r.get("ttft_warm_more_s", [])])
        med = (warm[(len(warm) - 1) // 2] + warm[len(warm) // 2]) / 2
        disk = (f"{r['fa4_kernels_after_start']} → {r['fa4_kernels_after_first_requests']}"
                if "fa4_kernels_after_start" in r else "-")
        prof = " (cProfile)" if "cprofile_first" in r else ""
        num = lambda key, fmt: format(r[key], fmt) if key in r else "-"  # noqa: E731
        lines.append(f"| {name} | {r['block_size_arg'] or 'default'} → {r['block_size']} | "
                     f"{'/'.join(map(str, pages))} | {r['engine_start_s']:.1f} | {disk} | {r['ttft_first_s']:.3f}{prof} | "
                     f"{med:.3f} | {r['ttft_first_s'] / med:.2f} | {num('prefill_tok_s', '.0f')} | "
                     f"{num('decode_tok_s', '.0f')} |")
    ratio = []
    for a, b in (("forged-b16", "stock-default"), ("forged-b64", "stock-b64"), ("forged-default", "stock-default")):
        if a in rs and b in rs and "prefill_tok_s" in rs[a] and "prefill_tok_s" in rs[b] and "decode_tok_s" in rs[a]:
            ratio.append(f"| {a} / {b} | {rs[a]['prefill_tok_s'] / rs[b]['prefill_tok_s']:.3f} | "
                         f"{rs[a]['decode_tok_s'] / rs[b]['decode_tok_s']:.3f} |")
    if ratio:
        lines += ["", "| ratio | prefill | decode |", "|---|---|---|", *ratio]
    cmp = []
    for a, b in (("forged-b16", "stock-default"), ("forged-default", "stock-default"), ("stock-default", "triton"),
                 ("forged-default", "triton"), ("forged-b64", "stock-b64")):
        if a in rs and b in rs and "greedy" in rs[a] and "greedy" in rs[b]:
            same, maxdiff = _cmp(rs[a], rs[b])
            cmp.append(f"| {a} vs {b} | {same:.3f} | {maxdiff:.4f} |")
    if cmp:
        lines += ["", f"| greedy ({GREEDY_N} prompts × {DECODE[2] + 1} tokens) | identical-prefix token share | "
                  "max logprob diff on it |", "|---|---|---|", *cmp]
    # is the comparison worth anything: do outputs depend on the prompt, and match transformers?
    hf_path = OUT / "e2e_hf.json"
    hf = json.loads(hf_path.read_text()) if hf_path.is_file() else None
    sanity = ["", "| config | distinct tokens in greedy outputs | mean logprob of chosen tokens | first token = "
              "transformers' |", "|---|---|---|---|"]
    for name, r in rs.items():
        if "greedy" not in r:
            continue
        toks = [t for g in r["greedy"] for t in g["tokens"]]
        lps = [x for g in r["greedy"] for x in g["logprobs"]]
        agree = (f"{sum(g['tokens'][0] == h['token'] for g, h in zip(r['greedy'], hf))}/{len(hf)}" if hf else "-")
        sanity.append(f"| {name} | {len(set(toks))} | {sum(lps) / len(lps):.3f} | {agree} |")
    if len(sanity) > 3:
        lines += sanity
    prof = [(n, r) for n, r in rs.items() if r.get("profile")]
    if prof:
        lines += ["", "| config | prefill step kernel time ms | attention ms | attention share | head-512 FA4 kernel ms "
                  "| its TFLOP/s |", "|---|---|---|---|---|---|"]
        for n, r in prof:
            p = r["profile"]
            fa4 = sum(k["ms"] for k in p["top"] if "FlashAttentionForwardSm90" in k["kernel"])
            wide = [lay for lay in r["layers"].values() if lay.get("fa_version") == 4 and (lay.get("head_size") or 0) > 256]
            # 4 causal prompts of 8192 tokens: QK^T and PV, 2 FLOP per MAC, half the square
            flops = len(wide) * 4 * 2 * 2 * (PREFILL[1] ** 2 / 2) * 32 * 512
            lines.append(f"| {n} | {p['kernel_time_ms']:.1f} | {p['attention_ms']:.1f} | {p['attention_share']:.3f} | "
                         f"{fa4:.1f} | {flops / (fa4 / 1e3) / 1e12:.0f} |" if fa4 else
                         f"| {n} | {p['kernel_time_ms']:.1f} | {p['attention_ms']:.1f} | {p['attention_share']:.3f} | - | - |")
    text = "\n".join(lines) + "\n"
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "e2e.md").write_text(text)
    print(text, flush=True)


def stop() -> int:
    """End a background `run` and its children (by argv, not by a pattern that matches the caller)."""
    import signal
    me = os.getpid()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == me:
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(argv) > 2 and argv[1].endswith(b"gpu_e2e.py") and argv[2] in (b"run", b"child"):
            try:
                os.kill(int(proc.name), signal.SIGKILL)
                print(f"stopped {proc.name}: {b' '.join(argv[1:4]).decode()}")
            except OSError:
                pass
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    su = sub.add_parser("setup")
    su.add_argument("--root", default="/tmp/e2e")
    r = sub.add_parser("run")
    r.add_argument("--root", default="/tmp/e2e")
    r.add_argument("--only")
    r.add_argument("--layers", type=int, default=6)
    r.add_argument("--vocab", type=int, default=16384)
    r.add_argument("--profile", action="store_true")
    r.add_argument("--workloads", help="what configurations without their own choice run (default: "
                   "ttft,prefill,decode,profile)")
    r.add_argument("--timeout", type=int, default=420)
    c = sub.add_parser("child")
    c.add_argument("name", choices=list(CONFIGS))
    c.add_argument("--model", required=True)
    c.add_argument("--profile", action="store_true")
    sub.add_parser("stop")
    p = sub.add_parser("report")
    p.add_argument("results", nargs="+", type=Path)
    args = ap.parse_args()
    if args.cmd == "child":
        OUT.mkdir(parents=True, exist_ok=True)
        return child(args)
    if args.cmd == "stop":
        return stop()
    if args.cmd == "setup":
        return setup(args)
    if args.cmd == "report":
        report(args.results)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
