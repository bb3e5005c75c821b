"""`vllm-forge bench`: vLLM's engine end to end, stock against forged, each configuration in its own process.

The model: transformers' Gemma4TextConfig with Gemma-4-31B's attention and MLP shapes
(gemma4-31b-shape.json beside this file), `--layers` layers in the model's own 5:1 sliding:global
pattern, a small vocabulary, random bf16 weights (seeded) written once as safetensors and loaded by
every configuration; prompts are token ids (no tokenizer). A configuration is a side -- `stock` or
`forged`, a directory holding that vLLM (`pip install --no-deps --target DIR wheel`) -- plus vLLM
engine arguments and environment variables. Each runs in a fresh interpreter with its directory,
then every `--site`, first on PYTHONPATH.

Per configuration: engine start, the block size the engine uses and the KV cache shape of each
attention layer as the engine holds it, TTFT (first request, then warm) and prefill tok/s for every
`--prompt-lens` length, decode tok/s for every `--decode` workload (N seqs x context x output
tokens: time of N+1 output tokens minus time of 1), greedy tokens of the first decode workload
(agreement with the first stock configuration), and with --profile the torch profiler's attention
share and head-512 FA4 kernel time of a prefill step. Results: OUT/bench_<config>.json each, OUT/bench.md.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import ForgeError
from ..output import make_output_dir
from .trees import runtime_path

SHAPE = Path(__file__).with_name("gemma4-31b-shape.json")
SIDES = ("stock", "forged")
DEFAULT_CONFIGS = ("stock=stock:--attention-backend FLASH_ATTN", "forged=forged:--attention-backend FLASH_ATTN")
GREEDY_N = 8          # prompts of the first decode workload whose tokens/logprobs are compared
MAX_BATCHED = 16384   # max_num_batched_tokens of every engine
GPU_MEMORY = 0.85     # gpu_memory_utilization
ENV_TOKEN = re.compile(r"[A-Z_][A-Z0-9_]*=")


@dataclass(frozen=True)
class Config:
    name: str
    side: str                     # stock | forged
    engine: dict[str, Any]        # LLM(...) keyword arguments from the engine arguments
    env: dict[str, str]
    args: str                     # as given


@dataclass(frozen=True)
class BenchRequest:
    paths: dict[str, Path]        # side -> directory holding that vllm/
    sites: tuple[Path, ...]
    out: Path
    configs: tuple[Config, ...]
    prompt_lens: tuple[int, ...] = (8192, 32768)
    prefill_tokens: int = 262144  # per prompt length: max(1, this // length) prompts in one generate
    decode: tuple[tuple[int, int, int], ...] = ((64, 1024, 256), (16, 32768, 256))
    layers: int = 6
    vocab: int = 16384
    profile: bool = True
    hf_reference: bool = True
    timeout: int = 1800
    work: Path | None = None      # checkpoint and caches (default: OUT/work)
    python: str = sys.executable

    @property
    def work_dir(self) -> Path:
        return (self.work or self.out / "work").resolve()


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def engine_kwargs(args: list[str]) -> dict[str, Any]:
    """vLLM CLI-style engine arguments as LLM(...) keywords: `--block-size 32` -> block_size=32,
    `--attention-backend X` -> attention_config={'backend': X}, `--a.b=v` -> a={'b': v}, `--flag` -> True."""
    kw: dict[str, Any] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--") or len(a) == 2:
            raise ForgeError(f"engine argument {a!r} is not an --option", "write vLLM's own option names, e.g. "
                             "--block-size 32")
        key, eq, val = a[2:].partition("=")
        if not eq:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                val, i = args[i + 1], i + 1
            else:
                val = "true"
        i += 1
        key = key.replace("-", "_")
        if key == "attention_backend":
            key = "attention_config.backend"
        if "." in key:
            top, sub = key.split(".", 1)
            kw.setdefault(top, {})[sub] = _value(val)
        else:
            kw[key] = _value(val)
    return kw


def parse_config(spec: str) -> Config:
    """NAME=SIDE[:ENGINE ARGS AND VAR=VALUE ENVIRONMENT],
    e.g. 'forged-b32=forged:--block-size 32 VLLM_FORGE_RUNTIME=0'."""
    name, eq, rest = spec.partition("=")
    side, _, args = rest.partition(":")
    if not eq or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or side not in SIDES:
        raise ForgeError(f"--config {spec!r}", "write NAME=stock|forged[:ENGINE ARGS], e.g. "
                         "'forged-b32=forged:--attention-backend FLASH_ATTN --block-size 32'")
    try:
        tokens = shlex.split(args)
    except ValueError as e:
        raise ForgeError(f"--config {spec!r}: {e}", "quote engine arguments as a shell would") from None
    env = dict(t.split("=", 1) for t in tokens if ENV_TOKEN.match(t))
    return Config(name, side, engine_kwargs([t for t in tokens if not ENV_TOKEN.match(t)]), env, args)


def parse_decode(spec: str) -> tuple[int, int, int]:
    m = re.fullmatch(r"(\d+)x(\d+)x(\d+)", spec)
    if not m or 0 in (n := tuple(int(g) for g in m.groups())):
        raise ForgeError(f"--decode {spec!r}", "write SEQSxCONTEXTxOUTPUT_TOKENS, e.g. 16x32768x256")
    return n  # type: ignore[return-value]


def parse_lens(spec: str) -> tuple[int, ...]:
    try:
        lens = tuple(int(x) for x in spec.split(","))
    except ValueError:
        lens = ()
    if not lens or min(lens) < 16:
        raise ForgeError(f"--prompt-lens {spec!r}", "give token counts >= 16, comma-separated, e.g. 8192,32768,131072")
    return lens


def check_request(req: BenchRequest) -> None:
    names = [c.name for c in req.configs]
    if len(set(names)) != len(names):
        raise ForgeError(f"--config names repeat: {', '.join(names)}", "give each configuration its own name")
    for side in sorted({c.side for c in req.configs}):
        d = req.paths.get(side)
        if d is None:
            raise ForgeError(f"a configuration runs on the {side} vLLM but --{side}-path is missing",
                             f"give --{side}-path DIR (pip install --no-deps --target DIR the {side} wheel)")
        if not (d / "vllm" / "__init__.py").is_file():
            raise ForgeError(f"--{side}-path {d} holds no vllm/ package", "give the --target directory of the wheel")
    for s in req.sites:
        if not s.is_dir():
            raise ForgeError(f"--site {s} is not a directory", "give a pip --target directory")


# ------------------------------------------------------------------ the parent: no torch, no vLLM
def require_gpu(python: str) -> None:
    """The configurations' interpreter sees a CUDA device (asked in a child: this process stays without torch)."""
    probe = ("import sys, torch; print(torch.__version__, torch.version.cuda); "
             "sys.exit(0 if torch.cuda.is_available() else 3)")
    try:
        r = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=300, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ForgeError(f"cannot run {python}: {e}", "give --python an interpreter with a CUDA torch") from None
    if r.returncode == 3:
        raise ForgeError(f"no CUDA GPU visible to torch {r.stdout.split()[0]} (CUDA build: {r.stdout.split()[1]}) "
                         f"in {python}", "run it on the GPU machine")
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        raise ForgeError(f"{python} cannot import torch: {last}", "give --python an interpreter with a CUDA torch")


def bench(req: BenchRequest) -> int:
    check_request(req)
    require_gpu(req.python)
    make_output_dir(req.out)
    work = req.work_dir
    work.mkdir(parents=True, exist_ok=True)
    model = work / f"model-{req.layers}l-{req.vocab}"
    first = next((c for c in req.configs if c.side == "stock"), req.configs[0])
    rc = 0
    hf_missing = req.hf_reference and not (req.out / "bench_hf.json").is_file()
    missing = not (model / "model.safetensors").is_file() or hf_missing
    if missing and _child(req, "prepare", first, {"model": str(model)}, req.out / "bench_prepare.log"):
        return 1
    for cfg in req.configs:
        print(f"== {cfg.name} ({cfg.side}: {cfg.args or 'no engine arguments'})", flush=True)
        rc |= _child(req, "run", cfg, {"model": str(model), "config": asdict(cfg)}, req.out / f"bench_{cfg.name}.log")
    paths = [req.out / f"bench_{c.name}.json" for c in req.configs if (req.out / f"bench_{c.name}.json").is_file()]
    text = report(load_results(paths), _hf(req.out))
    (req.out / "bench.md").write_text(text)
    print(text, flush=True)
    return rc


def _child(req: BenchRequest, what: str, cfg: Config, spec: dict[str, Any], log: Path) -> int:
    """One fresh interpreter: the side's vLLM, then --site directories, then vllm-forge itself."""
    here = str(Path(__file__).resolve().parents[2])  # the directory holding vllm_forge
    path = [str(req.paths[cfg.side].resolve()), *(p for s in req.sites for p in runtime_path(s.resolve())), here]
    work = req.work_dir
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "VLLM_USE_FLASHINFER_SAMPLER": "0", "VLLM_CACHE_ROOT": str(work / f"vllm-cache-{cfg.side}"),
           "VLLM_FORGE_FA4_CACHE_DIR": str(work / f"fa4-cache-{cfg.name}"), **cfg.env}
    spec_file = req.out / f"bench_{cfg.name if what == 'run' else what}.spec.json"
    request = {k: v for k, v in asdict(req).items() if k in ("prompt_lens", "prefill_tokens", "decode", "profile")}
    spec_file.write_text(json.dumps({**spec, "out": str(req.out.resolve()), "layers": req.layers, "vocab": req.vocab,
                                     "hf_reference": req.hf_reference, "request": request}, indent=1))
    t = time.perf_counter()
    try:
        with open(log, "w") as f:
            r = subprocess.run([req.python, "-m", "vllm_forge.gpu.bench", what, str(spec_file)], env=env, stdout=f,
                               stderr=subprocess.STDOUT, timeout=req.timeout, check=False)
        code = r.returncode
    except subprocess.TimeoutExpired:
        code = 124
    tail = log.read_text(errors="replace").splitlines()
    print(f"   {what} {cfg.name}: exit {code} after {time.perf_counter() - t:.0f} s; log {log}", flush=True)
    if code:
        print("\n".join("   | " + ln[-300:] for ln in tail[-25:]), flush=True)
    return 1 if code else 0


def _hf(out: Path) -> list[dict[str, Any]] | None:
    for name in ("bench_hf.json", "e2e_hf.json"):
        if (out / name).is_file():
            return json.loads((out / name).read_text())  # type: ignore[no-any-return]
    return None


# ------------------------------------------------------------------ the children (GPU)
def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import random
    r = random.Random(seed)
    return [[r.randrange(16, vocab) for _ in range(length)] for _ in range(n)]


def prepare(spec: dict[str, Any]) -> None:
    """The checkpoint (random weights, seeded) and, with hf_reference, transformers' own first greedy
    token of the first GREEDY_N decode prompts on it."""
    import torch
    from safetensors.torch import save_file
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    model, layers, vocab = Path(spec["model"]), spec["layers"], spec["vocab"]
    if not (model / "model.safetensors").is_file():
        kw = {k: v for k, v in json.loads(SHAPE.read_text()).items() if not k.startswith("_")}
        pattern = kw.pop("sliding_window_pattern")
        # untied: with random weights, tied embeddings (and Gemma's sqrt(hidden) embedding scale) make the
        # model copy its last input token with probability ~1, whatever attention computes
        kw["tie_word_embeddings"] = False
        kw["layer_types"] = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)]
        kw.update(torch_dtype="bfloat16", architectures=["Gemma4ForCausalLM"])
        cfg = Gemma4TextConfig(num_hidden_layers=layers, vocab_size=vocab, vocab_size_per_layer_input=vocab, **kw)
        with torch.device("meta"):
            meta = Gemma4ForCausalLM(cfg)
        g = torch.Generator(device="cuda").manual_seed(1234)
        tensors = {}
        for name, p in meta.state_dict().items():
            if p.dim() < 2:  # norm weights (Gemma-4 multiplies by w, initialised to 1), layer scalars
                t = torch.ones(p.shape, dtype=torch.bfloat16, device="cuda")
            else:
                t = torch.empty(p.shape, dtype=torch.bfloat16, device="cuda").normal_(0, 0.02, generator=g)
            tensors[name] = t.cpu()
        model.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
        cfg.save_pretrained(model)
        info = {"params": sum(t.numel() for t in tensors.values()), "layer_types": kw["layer_types"]}
        (Path(spec["out"]) / "bench_model.json").write_text(json.dumps(info, indent=1))
        print(f"checkpoint: {info['params'] / 1e9:.2f} B params, {info['layer_types']}", flush=True)
        del tensors
    if spec["hf_reference"]:
        m = Gemma4ForCausalLM.from_pretrained(model, dtype=torch.bfloat16).cuda().eval()  # type: ignore[call-arg]
        rows = []
        with torch.no_grad():
            n, ctx, _ = spec["request"]["decode"][0]  # the first decode workload's first prompts
            for ids in _prompts(min(n, GREEDY_N), ctx, vocab, seed=13):
                lp = torch.log_softmax(m(torch.tensor([ids], device="cuda")).logits[0, -1].float(), -1)
                tok = int(lp.argmax())
                gap = float(lp.topk(2).values.diff().abs())
                rows.append({"token": tok, "logprob": float(lp[tok]), "top2_gap": gap})
        (Path(spec["out"]) / "bench_hf.json").write_text(json.dumps(rows, indent=1))


def _layers(llm: Any) -> dict[str, Any]:
    """What vLLM really used per attention layer: backend, FA version, the KV cache tensor's shape."""
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


def _attention_share(llm: Any, prompts: list[Any], sp: Any) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        llm.generate(prompts, sp, use_tqdm=False)
        torch.cuda.synchronize()
    rows: list[tuple[str, float, int]] = []
    for e in prof.key_averages():
        t = float(getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0))
        if t > 0:
            rows.append((e.key, t, e.count))
    rows.sort(key=lambda r: -r[1])
    total = sum(t for _, t, _ in rows)

    def is_attn(k: str) -> bool:
        return any(w in k.lower() for w in ("flash", "fmha", "attn", "attention"))
    attn = sum(t for k, t, _ in rows if is_attn(k))
    return {"kernel_time_ms": total / 1e3, "attention_ms": attn / 1e3, "attention_share": attn / total if total else 0,
            "fa4_sm90_ms": sum(t for k, t, _ in rows if "FlashAttentionForwardSm90" in k) / 1e3,
            "top": [{"kernel": k[:160], "ms": t / 1e3, "calls": c, "attention": is_attn(k)} for k, t, c in rows[:15]]}


def run_config(spec: dict[str, Any]) -> None:
    t_start = time.perf_counter()
    cfg, req = spec["config"], spec["request"]
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    import_s = time.perf_counter() - t_start
    vocab = spec["vocab"]
    lens = req["prompt_lens"]
    longest = max([*lens, *(c + o for _, c, o in req["decode"])])
    kw = {"model": spec["model"], "skip_tokenizer_init": True, "dtype": "bfloat16", "max_model_len": longest + 16,
          "gpu_memory_utilization": GPU_MEMORY, "enable_prefix_caching": False, "max_num_seqs": 64,
          "max_num_batched_tokens": MAX_BATCHED, "seed": 0, **cfg["engine"]}
    t0 = time.perf_counter()
    llm = LLM(**kw)
    res: dict[str, Any] = {"format": 2, "name": cfg["name"], "side": cfg["side"], "args": cfg["args"],
                           "env": cfg["env"], "vllm": vllm.__version__, "vllm_path": str(Path(vllm.__file__).parent),
                           "import_s": import_s, "engine_start_s": time.perf_counter() - t0,
                           "block_size_arg": cfg["engine"].get("block_size"),
                           "block_size": llm.llm_engine.vllm_config.cache_config.block_size, "layers": _layers(llm),
                           "prefill": {}, "decode": {}}

    def prompts(ps: list[list[int]]) -> list[Any]:
        return [TokensPrompt(prompt_token_ids=p) for p in ps]

    def timed(ps: list[Any], sp: Any) -> tuple[float, Any]:
        t = time.perf_counter()
        outs = llm.generate(ps, sp, use_tqdm=False)
        return time.perf_counter() - t, outs

    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    for n, length in enumerate(lens):
        first, *warm = _prompts(5, length, vocab, seed=7 + n)
        row: dict[str, Any] = {"ttft_first_s": timed(prompts([first]), one)[0],
                               "ttft_warm_s": [timed(prompts([p]), one)[0] for p in warm]}
        count = max(1, req["prefill_tokens"] // length)
        batch = prompts(_prompts(count, length, vocab, seed=11 + n))
        timed(batch[:2], one)  # warm-up at this batch shape
        best = min(timed(batch, one)[0] for _ in range(2))
        row.update(prompts=count, prefill_s=best, tok_s=count * length / best)
        res["prefill"][str(length)] = row
        print(f"prefill {length}: {row['tok_s']:.0f} tok/s, TTFT warm {sorted(row['ttft_warm_s'])[1]:.3f} s",
              flush=True)
    for k, (n, ctx, out_tokens) in enumerate(req["decode"]):
        dec = prompts(_prompts(n, ctx, vocab, seed=13 if k == 0 else 13 + 100 * k))
        greedy = SamplingParams(max_tokens=out_tokens + 1, temperature=0.0, ignore_eos=True, logprobs=1)
        t1s, tns = [], []
        for _ in range(2):  # best of two: decode steps are short and the host may be shared
            t1s.append(timed(dec, one)[0])
            tn, outs = timed(dec, greedy)
            tns.append(tn)
        drow: dict[str, Any] = {"decode_s": min(tns) - min(t1s), "tok_s": n * out_tokens / (min(tns) - min(t1s))}
        if k == 0:
            drow["greedy"] = [{"tokens": list(o.outputs[0].token_ids), "logprobs": [
                lp[tok].logprob for lp, tok in zip(o.outputs[0].logprobs, o.outputs[0].token_ids, strict=False)]}
                for o in outs[:GREEDY_N]]
        res["decode"][f"{n}x{ctx}x{out_tokens}"] = drow
        print(f"decode {n}x{ctx}x{out_tokens}: {drow['tok_s']:.0f} tok/s", flush=True)
    if req["profile"]:  # the prefill of 4 prompts of the first length, every step of it
        res["profile"] = _attention_share(llm, prompts(_prompts(4, lens[0], vocab, seed=17)), one)
        res["profile"]["prompts"] = [lens[0]] * 4
    (Path(spec["out"]) / f"bench_{cfg['name']}.json").write_text(json.dumps(res, indent=1))


# ------------------------------------------------------------------ report (from saved JSON)
def upgrade(r: dict[str, Any]) -> dict[str, Any]:
    """A result of the earlier harness (scripts/gpu_e2e.py: 8192-token TTFT, 32 x 8192 prefill,
    64 x 1024 x 256 decode) in this module's form."""
    if r.get("format") == 2:
        return r
    new = {**r, "format": 2, "side": r.get("tree"), "args": f"--attention-backend {r.get('backend')}"
           + (f" --block-size {r['block_size_arg']}" if r.get("block_size_arg") else ""), "prefill": {}, "decode": {}}
    if "ttft_first_s" in r:
        new["prefill"]["8192"] = {"ttft_first_s": r["ttft_first_s"],
                                  "ttft_warm_s": [r["ttft_warm_s"], *r.get("ttft_warm_more_s", [])]}
        if "prefill_tok_s" in r:
            new["prefill"]["8192"].update(prompts=32, prefill_s=r["prefill_s"], tok_s=r["prefill_tok_s"])
    if "decode_tok_s" in r:
        new["decode"]["64x1024x256"] = {"decode_s": r["decode_s"], "tok_s": r["decode_tok_s"],
                                        "greedy": r.get("greedy")}
    if r.get("profile"):
        p = r["profile"]
        new["profile"] = {**p, "prompts": [8192] * 4, "fa4_sm90_ms": p.get("fa4_sm90_ms", sum(
            k["ms"] for k in p["top"] if "FlashAttentionForwardSm90" in k["kernel"]))}
    return new


def load_results(paths: list[Path]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for p in paths:
        try:
            r = json.loads(p.read_text())
            missing = [k for k in ("name", "layers", "block_size", "engine_start_s") if k not in r]  # old or new
            if missing:
                raise KeyError(missing[0])
            out[r["name"]] = upgrade(r)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ForgeError(f"cannot read bench result {p}: {type(e).__name__}: {e}",
                             "give the bench_<config>.json files a run wrote") from None
    return out


def report_paths(paths: list[Path]) -> str:
    """The tables of saved results: files as given; of a directory, every JSON file that is a result
    (the checkpoint's, transformers' reference, specs and manifests beside them are skipped)."""
    files: list[Path] = []
    for p in paths:
        if not p.is_dir():
            files.append(p)
            continue
        for f in sorted(p.glob("*.json")):
            try:
                r = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(r, dict) and "name" in r and "layers" in r:
                files.append(f)
    hf = next((_hf(p) for p in paths if p.is_dir() and _hf(p)), None)
    return report(load_results(files), hf)


def _greedy(r: dict[str, Any]) -> list[dict[str, Any]] | None:
    first: dict[str, Any] = next(iter(r["decode"].values()), {})
    return first.get("greedy")


def agreement(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> tuple[float, float]:
    """Share of tokens on the identical prefix of each pair of greedy outputs, and the largest logprob
    difference on it (after the first difference the contexts differ)."""
    same = 0
    maxdiff = 0.0
    for x, y in zip(a, b, strict=False):
        for i, (tx, ty) in enumerate(zip(x["tokens"], y["tokens"], strict=False)):
            if tx != ty:
                break
            same += 1
            maxdiff = max(maxdiff, abs(x["logprobs"][i] - y["logprobs"][i]))
    ntok = sum(len(x["tokens"]) for x in a)
    return (same / ntok if ntok else 0.0), maxdiff


def report(rs: dict[str, dict[str, Any]], hf: list[dict[str, Any]] | None = None) -> str:
    if not rs:
        return "no results\n"
    lens = sorted({int(k) for r in rs.values() for k in r["prefill"]})
    decs = list(dict.fromkeys(k for r in rs.values() for k in r["decode"]))
    head = ["config", "vLLM", "block size (arg → used)", "head-512 KV cache shape", "engine start s"]
    head += [f"{n} prefill tok/s | {n} TTFT first / warm s" for n in lens] + [f"decode {d} tok/s" for d in decs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * sum(h.count("|") + 1 for h in head)]
    for name, r in rs.items():
        shapes = sorted({str(lay["kv_cache_shape"]) for lay in r["layers"].values()
                         if (lay.get("head_size") or 0) > 256 and lay.get("kv_cache_shape")})
        cells = [name, str(r.get("vllm", "-")), f"{r.get('block_size_arg') or 'default'} → {r['block_size']}",
                 " ".join(shapes) or "-", f"{r['engine_start_s']:.1f}"]
        for n in lens:
            p = r["prefill"].get(str(n))
            cells.append(f"{p['tok_s']:,.0f}" if p and "tok_s" in p else "-")
            cells.append(f"{p['ttft_first_s']:.3f} / {statistics.median(p['ttft_warm_s']):.3f}" if p else "-")
        cells += [f"{r['decode'][d]['tok_s']:,.0f}" if d in r["decode"] else "-" for d in decs]
        lines.append("| " + " | ".join(cells) + " |")
    stock = next((n for n, r in rs.items() if r.get("side") == "stock"), None)
    if stock:
        lines += ["", f"| vs {stock} (time ratio as throughput) | " + " | ".join(
            [f"prefill {n}" for n in lens] + [f"decode {d}" for d in decs]) + " | greedy identical-prefix share "
            "| max logprob diff on it |", "|---|" + "---|" * (len(lens) + len(decs) + 2)]
        for name, r in rs.items():
            if name == stock:
                continue
            s = rs[stock]
            cells = [f"{r['prefill'][str(n)]['tok_s'] / s['prefill'][str(n)]['tok_s']:.3f}"
                     if "tok_s" in r["prefill"].get(str(n), {}) and "tok_s" in s["prefill"].get(str(n), {}) else "-"
                     for n in lens]
            cells += [f"{r['decode'][d]['tok_s'] / s['decode'][d]['tok_s']:.3f}"
                      if d in r["decode"] and d in s["decode"] else "-" for d in decs]
            ga, gb = _greedy(r), _greedy(s)
            same, diff = agreement(ga, gb) if ga and gb else (None, None)
            cells += [f"{same:.3f}" if same is not None else "-", f"{diff:.4f}" if diff is not None else "-"]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if hf:
        lines += ["", "| config | distinct tokens in greedy outputs | mean logprob of chosen tokens | first token = "
                  "transformers' |", "|---|---|---|---|"]
        for name, r in rs.items():
            g = _greedy(r)
            if g:
                toks = [t for x in g for t in x["tokens"]]
                lps = [x for y in g for x in y["logprobs"]]
                agree = sum(x["tokens"][0] == h["token"] for x, h in zip(g, hf, strict=False))
                lines.append(f"| {name} | {len(set(toks))} | {sum(lps) / len(lps):.3f} | {agree}/{len(hf)} |")
    prof = [(name, r) for name, r in rs.items() if r.get("profile")]
    if prof:
        lines += ["", "| config | profiled prefill (prompts) | kernel time ms | attention ms | attention share | "
                  "head-512 FA4 kernel ms | its TFLOP/s |", "|---|---|---|---|---|---|---|"]
        for name, r in prof:
            p = r["profile"]
            wide = [lay for lay in r["layers"].values()
                    if lay.get("fa_version") == 4 and (lay.get("head_size") or 0) > 256]
            # causal prompts: QK^T and PV, 2 FLOP per MAC, half the square, 32 q heads of 512
            flops = len(wide) * sum(2 * 2 * (q ** 2 / 2) * 32 * 512 for q in p["prompts"])
            fa4 = p.get("fa4_sm90_ms") or 0
            lines.append(f"| {name} | {len(p['prompts'])} × {p['prompts'][0]} | {p['kernel_time_ms']:.1f} | "
                         f"{p['attention_ms']:.1f} | {p['attention_share']:.3f} | " +
                         (f"{fa4:.1f} | {flops / (fa4 / 1e3) / 1e12:.0f} |" if fa4 and flops else "- | - |"))
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    """The children: `python -m vllm_forge.gpu.bench prepare|run SPEC.json`."""
    what, spec_file = argv
    spec = json.loads(Path(spec_file).read_text())
    if what == "prepare":
        prepare(spec)
    else:
        run_config(spec)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
