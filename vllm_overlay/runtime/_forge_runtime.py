"""vllm-forge runtime layer of a forged vLLM wheel (installed as ``vllm/_forge_runtime.py``).

vLLM loads it in every process as a general plugin (entry point ``vllm.general_plugins`` →
``forge``; ``VLLM_PLUGINS`` filters plugins by name as usual). It changes three serving defaults
for FA4 on Hopper and logs each decision with the prefix ``vllm-forge:``:

1. **FA4 kernel cache on disk** (FA4's own ``cache_utils``: ``FLASH_ATTENTION_CUTE_DSL_CACHE_*``),
   under ``<root>/<device key>/<FA4 fingerprint>/``. FA4's fingerprint covers its sources, the
   cutlass-dsl and tvm-ffi versions and Python; the device key adds the GPU (name, compute
   capability), torch and its CUDA, so another FA tree, cutlass-dsl or GPU never loads a stale
   kernel. Root: ``VLLM_FORGE_FA4_CACHE_DIR``, else ``$VLLM_CACHE_ROOT/fa4``, else
   ``~/.cache/vllm/fa4``. ``VLLM_FORGE_FA4_CACHE=0`` turns it off; a user-set
   ``FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED`` wins.
2. **FA4 variants compiled at start-up**: before vLLM's own warm-up and CUDA-graph capture, every
   FA4 attention layer shape is called once per kernel variant that serving can reach (prefill and
   decode; split-KV off and on; the split-KV combine at each specialisation 16/32/64/128), on the
   layer's real KV-cache tensors, so no request pays a compile (or a cache load).
   ``VLLM_FORGE_FA4_WARMUP=0`` turns it off.
3. **64-token pages for FA4 head > 256 on SM90**: FA4 loads K/V by TMA only when the page equals
   its 64-row tile; with 16-token pages it falls back to cp.async (~30% slower at head 512). When
   the user did not choose ``--block-size``, the block size becomes the smallest one that gives
   those layers 64-token pages as vLLM itself will lay the KV cache out (its layers' own
   ``get_kv_cache_spec`` and ``unify_kv_cache_spec_page_size``): Gemma-4 on 0.22.x: 32 (its head-512
   global layers have half the per-token bytes of its head-256 sliding layers); on 0.25.x: 64
   (sliding-window layers pick their own 16-token blocks there). The warm-up (2.) logs the page
   size of the KV cache tensors each FA4 layer really got (0.33.0 moved the unification to
   ``kv_cache_planning``: looked up there first). Where vLLM's own backend pins those layers' kernel
   page (0.31.0 on, fp8 KV on SM90: 64, its FP8-KV kernel's tile, a larger KV block being split into
   kernel blocks), its block size is kept and the log line says so: upstream's rule is never overridden.
   ``VLLM_FORGE_FA4_PAGE64=0`` or an explicit ``--block-size`` keeps vLLM's choice.

4. **One real serving step at start-up**: vLLM's own warm-up runs dummy forwards whose attention
   metadata and slot mapping are not those of a request, so the first request still paid first-use
   costs (on 0.22.1: the Triton JIT of ``_compute_slot_mapping_kernel``, which vLLM's JIT monitor
   reports, and the cuBLAS kernels of prefill-sized GEMMs). Before vLLM starts that monitor, the worker runs what the scheduler would send for two
   requests (a long prompt and a short one): a prefill step, a decode step of both, a decode step of
   one, then frees them, through ``Worker.execute_model``/``sample_tokens`` (as vLLM's V2 model
   runner does with short prompts). RNG state is restored afterwards. ``VLLM_FORGE_SERVING_WARMUP=0``
   turns it off; it is skipped (with a log line) for pipeline parallelism, speculative decoding,
   KV transfer, pooling and Mamba-state models. In the front-end process, the first request's
   scan of installed logits-processor plugins (``importlib.metadata`` entry points, cached after
   the first call) is done when the ``InputProcessor`` is made.

``VLLM_FORGE_RUNTIME=0`` turns the whole layer off. Hooks that a release lacks are skipped with a
log line; nothing here is needed for correctness.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger("vllm.forge_runtime")

PAGE = 64  # FA4 SM90 head-512 tile_n: the page size that keeps TMA loads of K/V
SPLITS = (1, 2, 32, 64, 128)  # split-KV off, and one per combine specialisation (log2 4..7)
PREFILL_Q = 129  # more than one 128-row query tile


def _on(name: str) -> bool:
    return os.environ.get(name, "1") != "0"


# ---------------------------------------------------------------- 1. kernel cache
def device_key(name: str, capability: tuple[int, int], torch_version: str, cuda: str | None) -> str:
    """The part of the cache path FA4's own fingerprint lacks: GPU and torch/CUDA."""
    raw = f"gpu={name}|sm={capability[0]}{capability[1]}|torch={torch_version}|cuda={cuda}"
    slug = "".join(c if c.isalnum() else "-" for c in name).strip("-").lower()[:32]
    return f"{slug}-sm{capability[0]}{capability[1]}-{hashlib.sha256(raw.encode()).hexdigest()[:12]}"


def cache_root() -> Path:
    if os.environ.get("VLLM_FORGE_FA4_CACHE_DIR"):
        return Path(os.environ["VLLM_FORGE_FA4_CACHE_DIR"])
    if os.environ.get("VLLM_CACHE_ROOT"):
        return Path(os.environ["VLLM_CACHE_ROOT"]) / "fa4"
    return Path.home() / ".cache" / "vllm" / "fa4"


def _setup_cache() -> None:
    if not _on("VLLM_FORGE_FA4_CACHE"):
        logger.info("vllm-forge: FA4 kernel cache off (VLLM_FORGE_FA4_CACHE=0)")
        return
    if "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED" in os.environ:
        return  # the user's own setting
    try:
        import torch
        from vllm.platforms import current_platform

        cap = current_platform.get_device_capability()
        if cap is None:
            return
        key = device_key(current_platform.get_device_name(), (cap.major, cap.minor), torch.__version__,
                         torch.version.cuda)
    except Exception as e:  # no GPU visible (e.g. the API server process): nothing to key on
        logger.debug("vllm-forge: FA4 kernel cache not set up: %s", e)
        return
    path = cache_root() / key
    os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"] = "1"
    os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"] = str(path)
    # FA4 reads both at import; if it is already imported, set its module values too
    for mod in [m for n, m in list(sys.modules.items()) if n.endswith("vllm_flash_attn.cute.cache_utils")]:
        mod.CUTE_DSL_CACHE_ENABLED = True
        mod.CUTE_DSL_CACHE_DIR = str(path)
    logger.info("vllm-forge: FA4 kernel cache at %s", path)


# ---------------------------------------------------------------- 3. 64-token pages
BLOCK_SIZES = (16, 32, 64, 128, 256)  # the block sizes tried, smallest first


def page64_block_size(pages: Callable[[int], dict[str, int] | None],
                      candidates: tuple[int, ...] = BLOCK_SIZES) -> int | None:
    """The smallest block size with which every FA4 head>256 layer gets PAGE-token pages.

    pages(block_size): the page (tokens) of each such layer with that block size, as vLLM
    will lay the KV cache out (None: vLLM cannot lay it out)."""
    for size in candidates:
        got = pages(size)
        if got and set(got.values()) == {PAGE}:
            return size
    return None


def _pages(vllm_config: Any, layers: dict[str, Any], wide: set[str]) -> tuple[Callable[[int], dict[str, int] | None], str]:
    """pages(block_size) for the FA4 head>256 layers, and how it is known.

    Where the release has it, by vLLM's own code: every layer's ``get_kv_cache_spec`` with that
    block size (from 0.25 sliding-window layers pick their own block size), then
    ``unify_kv_cache_spec_page_size`` (a layer with a smaller page gets more tokens per page).
    Otherwise the same rule from the specs' page sizes."""
    cache = vllm_config.cache_config
    unify_kv_cache_spec_page_size = None
    for where in ("vllm.v1.core.kv_cache_planning", "vllm.v1.core.kv_cache_utils"):  # 0.33.0 moved it
        try:
            unify_kv_cache_spec_page_size = getattr(importlib.import_module(where), "unify_kv_cache_spec_page_size")
            break
        except (ImportError, AttributeError):
            continue

    def specs(size: int) -> dict[str, Any]:
        kept = cache.block_size
        cache.block_size = size
        try:
            got = {n: layer.get_kv_cache_spec(vllm_config) for n, layer in layers.items()}
        finally:
            cache.block_size = kept
        return {n: spec for n, spec in got.items() if spec is not None and getattr(spec, "block_size", 0)}

    def by_vllm(size: int) -> dict[str, int] | None:
        try:
            unified = unify_kv_cache_spec_page_size(specs(size))
        except (NotImplementedError, ValueError, AssertionError):
            return None
        return {n: int(unified[n].block_size) for n in wide if n in unified}

    def by_bytes(size: int) -> dict[str, int] | None:  # unify's rule: the largest page, in more tokens
        got = specs(size)
        largest = max(spec.page_size_bytes for spec in got.values())
        if any(largest % spec.page_size_bytes for spec in got.values()):
            return None
        return {n: int(got[n].block_size * largest // got[n].page_size_bytes) for n in wide if n in got}

    if unify_kv_cache_spec_page_size is not None:
        return by_vllm, "vLLM's own KV cache specs, unified"
    return by_bytes, "the KV cache specs' page sizes"


def _kernel_page(vllm_config: Any, layers: dict[str, Any], wide: set[str]) -> int | None:
    """The page size vLLM's own backend pins for the kernel of every FA4 head>256 layer, if it pins one
    (0.31.0 on: 64 for an fp8 KV cache on SM90, the FP8-KV kernel's tile; a larger KV block is then
    split into 64-token kernel blocks, so the KV block size no longer decides the kernel's pages)."""
    import inspect

    got = set()
    for name in wide:
        layer = layers[name]
        fn = getattr(getattr(layer, "attn_backend", None), "get_supported_kernel_block_sizes", None)
        try:
            if fn is None or "kv_cache_spec" not in inspect.signature(fn).parameters:
                return None
            sizes = fn(layer.get_kv_cache_spec(vllm_config))
        except (TypeError, ValueError, AttributeError, NotImplementedError):
            return None
        if len(sizes) != 1 or type(sizes[0]) is not int:
            return None
        got.add(sizes[0])
    return got.pop() if len(got) == 1 else None


def _fa4_wide_layers(vllm_config: Any) -> tuple[set[str], dict[str, Any]]:
    from vllm.config import get_layers_from_vllm_config
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase

    layers = get_layers_from_vllm_config(vllm_config, AttentionLayerBase)  # type: ignore[type-abstract]
    wide = {name for name, layer in layers.items()
            if getattr(getattr(layer, "impl", None), "vllm_flash_attn_version", None) == 4
            and getattr(layer.impl, "head_size", 0) > 256}
    return wide, layers


def _after_block_size(vllm_config: Any) -> None:
    cache = vllm_config.cache_config
    if not _on("VLLM_FORGE_FA4_PAGE64"):
        logger.info("vllm-forge: KV block size %d kept (VLLM_FORGE_FA4_PAGE64=0)", cache.block_size)
        return
    from vllm.platforms import current_platform

    cap = current_platform.get_device_capability()
    if cap is None or cap.major != 9:
        return
    wide, layers = _fa4_wide_layers(vllm_config)
    if not wide:
        return
    pages, how = _pages(vllm_config, layers, wide)
    impl = getattr(layers[sorted(wide)[0]], "impl", None)
    what = (f"the {len(wide)} FA4 layers of head {getattr(impl, 'head_size', '?')} "
            f"({getattr(impl, 'num_heads', '?')} q / {getattr(impl, 'num_kv_heads', '?')} kv heads)")

    def shown(got: dict[str, int] | None) -> str:
        return "/".join(map(str, sorted(set(got.values())))) if got else "?"

    pinned = _kernel_page(vllm_config, layers, wide)
    if pinned is not None:  # upstream's own rule (fp8 KV): never overridden
        logger.info("vllm-forge: KV block size %d kept: vLLM's own backend gives %s %d-token kernel pages",
                    cache.block_size, what, pinned)
        return

    if getattr(cache, "user_specified_block_size", False):
        logger.info("vllm-forge: --block-size %d chosen by the user: %s get %s-token pages (by %s; %d is the "
                    "fast one)", cache.block_size, what, shown(pages(cache.block_size)), how, PAGE)
        return
    size = page64_block_size(pages)
    if size is None:
        logger.info("vllm-forge: no KV block size gives %s %d-token pages (by %s); kept %d (%s-token pages)",
                    what, PAGE, how, cache.block_size, shown(pages(cache.block_size)))
        return
    if size == cache.block_size:
        logger.info("vllm-forge: KV block size %d already gives %s %d-token pages", size, what, PAGE)
        return
    logger.info("vllm-forge: KV block size %d -> %d: %s get %d-token pages instead of %s (by %s), the tile FA4 "
                "loads by TMA on SM90 (VLLM_FORGE_FA4_PAGE64=0 or --block-size keeps vLLM's choice)",
                cache.block_size, size, what, PAGE, shown(pages(cache.block_size)), how)
    cache.block_size = size


def _patch_platform(module: Any) -> None:
    def wrap(orig: Any) -> Callable[..., None]:
        func = orig.__func__

        def update_block_size_for_backend(cls: Any, vllm_config: Any) -> None:
            func(cls, vllm_config)
            try:
                _after_block_size(vllm_config)
            except Exception as e:
                logger.warning("vllm-forge: block-size check failed (%s); vLLM's choice kept", e)
        return update_block_size_for_backend

    _hook(getattr(module, "Platform", None), "Platform.update_block_size_for_backend", "block size kept", wrap,
          classmethod_=True)


def _hook(owner: Any, qualname: str, skipped: str, wrap: Callable[[Any], Callable[..., Any]],
          classmethod_: bool = False) -> None:
    """Replace owner.<attr> by wrap(original), once (a second load of the plugin is a no-op)."""
    attr = qualname.rsplit(".", 1)[1]
    orig = getattr(owner, attr, None)
    if orig is None:
        logger.info("vllm-forge: this vLLM has no %s: %s", qualname, skipped)
        return
    if getattr(orig, "_vllm_forge", False):
        return
    fn = wrap(orig)
    fn._vllm_forge = True  # type: ignore[attr-defined]
    setattr(owner, attr, classmethod(fn) if classmethod_ else fn)


# ---------------------------------------------------------------- 2. start-up compile
def _cache_files() -> int:
    d = os.environ.get("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR")
    return sum(1 for _ in Path(d).rglob("*.o")) if d and Path(d).is_dir() else 0


def kv_views(kv: Any, head_size: int) -> tuple[Any, Any] | None:
    """(key_cache, value_cache), each [blocks, page, kv heads, head], from a layer's KV cache tensor in
    the layouts vLLM's FLASH_ATTN backend has used (each release's forward splits it the same way):
    ``[2, blocks, page, heads, head]`` (0.20-0.22: ``unbind(0)``), ``[blocks, 2, page, heads, head]``
    (0.23-0.25: ``unbind(1)``), ``[blocks, heads, page, 2 * head]`` (0.26 on:
    ``transpose(1, 2).split(head, -1)``). None for anything else (or a 5-D cache of 2 blocks, which
    would be either)."""
    shape = tuple(getattr(kv, "shape", ()))
    if len(shape) == 5 and shape[-1] == head_size and (shape[0] == 2) != (shape[1] == 2):
        return tuple(kv.unbind(0 if shape[0] == 2 else 1))  # type: ignore[return-value]
    if len(shape) == 4 and shape[-1] == 2 * head_size:
        return tuple(kv.transpose(1, 2).split(head_size, dim=-1))  # type: ignore[return-value]
    return None


def fa4_layer_shapes(static_forward_context: dict[str, Any]) -> tuple[dict[tuple, tuple[str, Any, Any]], list[str]]:
    """One entry per distinct FA4 call shape: (dtype, page, kv heads, head, q heads, window,
    softcap, sinks) -> (layer name, impl, (key_cache, value_cache)); and the FA4 layers left out (a
    KV cache layout this does not know, or an fp8 KV cache): the caller says so."""
    shapes: dict[tuple, tuple[str, Any, Any]] = {}
    unknown: list[str] = []
    for name, layer in static_forward_context.items():
        impl = getattr(layer, "impl", None)
        if getattr(impl, "vllm_flash_attn_version", None) != 4:
            continue
        kv = getattr(layer, "kv_cache", None)
        kv = kv[0] if isinstance(kv, (list, tuple)) and kv else kv
        if kv is None or getattr(kv, "numel", lambda: 0)() == 0:
            continue
        views = kv_views(kv, int(impl.head_size))
        if views is None or kv.element_size() != 2:  # fp8 KV: its descales are not warmed here
            unknown.append(f"{name} {list(kv.shape)} {str(kv.dtype).replace('torch.', '')}")
            continue
        k = views[0]
        key = (str(kv.dtype), int(k.shape[1]), int(k.shape[2]), int(k.shape[3]), int(impl.num_heads),
               tuple(getattr(impl, "sliding_window", None) or (-1, -1)), float(impl.logits_soft_cap or 0),
               getattr(impl, "sinks", None) is not None)
        shapes.setdefault(key, (name, impl, views))
    return shapes, unknown


def _warm_one(impl: Any, views: tuple[Any, Any], dtype: Any) -> int:
    import torch
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    key_cache, value_cache = views
    num_blocks, page = int(key_cache.shape[0]), int(key_cache.shape[1])
    per_seq = max(1, min(num_blocks // 2, 8192 // page))
    dev = key_cache.device
    table = (torch.arange(2 * per_seq, device=dev, dtype=torch.int32) % num_blocks).view(2, per_seq)
    seqused = torch.full((2,), per_seq * page, device=dev, dtype=torch.int32)
    h, d = int(impl.num_heads), int(impl.head_size)
    calls = 0
    for q_len in (PREFILL_Q, 1):
        q_len = min(q_len, per_seq * page)
        # q as vLLM hands it over: a strided view into a fused qkv buffer
        qkv = torch.zeros(2 * q_len, (h + 2 * int(impl.num_kv_heads)) * d, device=dev, dtype=dtype)
        q = qkv[:, : h * d].view(2 * q_len, h, d)
        out = torch.empty(2 * q_len, h, d, device=dev, dtype=dtype)
        cu = torch.tensor([0, q_len, 2 * q_len], device=dev, dtype=torch.int32)
        for splits in SPLITS if q_len == 1 else (0, 1, 2):
            flash_attn_varlen_func(
                q=q, k=key_cache, v=value_cache, out=out, cu_seqlens_q=cu, max_seqlen_q=q_len,
                seqused_k=seqused, max_seqlen_k=per_seq * page, softmax_scale=impl.scale, causal=True,
                alibi_slopes=getattr(impl, "alibi_slopes", None),
                window_size=list(getattr(impl, "sliding_window", None) or (-1, -1)),
                block_table=table, softcap=impl.logits_soft_cap, fa_version=4,
                num_splits=min(splits, per_seq * page // PAGE) if splits else 0,
                **({"s_aux": impl.sinks} if getattr(impl, "sinks", None) is not None else {}))
            calls += 1
    torch.cuda.synchronize(dev)
    return calls


def fa4_warmup(worker: Any) -> None:
    if not _on("VLLM_FORGE_FA4_WARMUP"):
        logger.info("vllm-forge: FA4 start-up compile off (VLLM_FORGE_FA4_WARMUP=0)")
        return
    cfg = worker.vllm_config
    shapes, unknown = fa4_layer_shapes(cfg.compilation_config.static_forward_context)
    if unknown:
        logger.warning("vllm-forge: FA4 start-up compile skips %d layer(s) (fp8 KV, or a KV cache layout it does "
                       "not know: %s): their kernels compile on first use", len(unknown), ", ".join(unknown[:3]))
    if not shapes:
        return
    before, t0 = _cache_files(), time.perf_counter()
    calls = 0
    for key, (name, impl, views) in shapes.items():
        t = time.perf_counter()
        calls += _warm_one(impl, views, cfg.model_config.dtype)
        logger.info("vllm-forge: FA4 warm-up of %s (head %d, %d q / %d kv heads, %d-token pages, window %s, "
                    "softcap %s): %.1f s", name, key[3], key[4], key[2], key[1], key[5], key[6],
                    time.perf_counter() - t)
    new = _cache_files() - before
    logger.info("vllm-forge: FA4 start-up compile: %d layer shape(s), %d calls, %.1f s; %s",
                len(shapes), calls, time.perf_counter() - t0,
                f"{new} kernel(s) compiled and stored in the cache" if os.environ.get(
                    "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED") == "1" else "no on-disk cache")


# ---------------------------------------------------------------- 4. one real serving step
JIT_MONITORS = ("vllm.triton_utils.jit_monitor", "vllm.utils.jit_monitor")  # 0.22.x, 0.26+
WARMUP_IDS = ("_vllm_forge_warmup_a_", "_vllm_forge_warmup_b_")


def warmup_lengths(max_batched: int, max_model_len: int, short: int = 17) -> tuple[int, int] | None:
    """Prompt lengths of the two warm-up requests: a long one and a short one whose sum is a multiple
    of 16 (Triton specialises integer arguments on ==1 and %16==0; the decode steps give 2 and 1)."""
    long_ = min(max_batched - short, max_model_len - 3)
    long_ -= (long_ + short) % 16
    return (long_, short) if long_ > short else None


def _skip_reason(worker: Any) -> str | None:
    cfg = worker.vllm_config
    runner = getattr(worker, "model_runner", None)
    if getattr(cfg.parallel_config, "pipeline_parallel_size", 1) > 1:
        return "pipeline parallelism"
    if getattr(cfg, "speculative_config", None) is not None:
        return "speculative decoding"
    if getattr(cfg, "kv_transfer_config", None) is not None:
        return "KV transfer"
    if runner is None or getattr(runner, "is_pooling_model", False):
        return "pooling model"
    groups = getattr(getattr(runner, "kv_cache_config", None), "kv_cache_groups", None)
    if not groups:
        return "no KV cache groups"
    if any("Mamba" in type(g.kv_cache_spec).__name__ for g in groups):
        return "Mamba state"
    if not hasattr(worker, "execute_model") or not hasattr(worker, "sample_tokens"):
        return "this vLLM has no Worker.sample_tokens"
    return None


def serving_steps(runner: Any, lengths: tuple[int, int]) -> list[Any]:
    """SchedulerOutputs of the warm-up, as vLLM's scheduler would send them: prefill of requests A
    (long) and B (short), decode of both, decode of A with B finished, then A finished."""
    from vllm import SamplingParams
    from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
    from vllm.v1.request import Request

    groups = runner.kv_cache_config.kv_cache_groups
    sizes = [g.kv_cache_spec.block_size for g in groups]
    vocab = runner.model_config.get_vocab_size()
    ids = WARMUP_IDS
    nxt = 1  # block 0 is the null block
    blocks: dict[str, list[list[int]]] = {}
    for rid, n in zip(ids, lengths):
        blocks[rid] = []
        for bs in sizes:
            count = -(-(n + 2) // bs)  # the tokens held after both decode steps
            blocks[rid].append(list(range(nxt, nxt + count)))
            nxt += count
    if nxt > runner.kv_cache_config.num_blocks:
        raise ValueError(f"{nxt - 1} KV blocks needed, {runner.kv_cache_config.num_blocks} in the cache")
    sp = SamplingParams.for_sampler_warmup() if hasattr(SamplingParams, "for_sampler_warmup") else SamplingParams()
    sp.max_tokens = 4

    def prompt(n: int, salt: int) -> list[int]:
        return [(7 * i + salt) % vocab for i in range(n)]

    def step(num: dict[str, int], finished: set[str]) -> Any:
        so = SchedulerOutput.make_empty()
        so.num_scheduled_tokens = num
        so.total_num_scheduled_tokens = sum(num.values())
        so.num_common_prefix_blocks = [0] * len(groups)
        so.finished_req_ids = finished
        return so

    pre = step({rid: n for rid, n in zip(ids, lengths)}, set())
    pre.scheduled_new_reqs = [
        NewRequestData.from_request(Request(rid, prompt(n, i), sp, None),
                                    block_ids=tuple(blocks[rid]), prefill_token_ids=prompt(n, i))
        for i, (rid, n) in enumerate(zip(ids, lengths))]
    out = [pre]
    for k, live in enumerate((ids, ids[:1])):
        so = step({rid: 1 for rid in live}, set(ids) - set(live))
        cached = CachedRequestData.make_empty()
        cached.req_ids = list(live)
        cached.num_computed_tokens = [lengths[ids.index(rid)] + k for rid in live]
        cached.num_output_tokens = [k + 1 for _ in live]
        cached.new_block_ids = [None for _ in live]
        so.scheduled_cached_reqs = cached
        out.append(so)
    out.append(step({}, {ids[0]}))
    return out


def serving_warmup(worker: Any) -> None:
    if not _on("VLLM_FORGE_SERVING_WARMUP"):
        logger.info("vllm-forge: serving warm-up off (VLLM_FORGE_SERVING_WARMUP=0)")
        return
    reason = _skip_reason(worker)
    if reason:
        logger.info("vllm-forge: serving warm-up skipped (%s)", reason)
        return
    import torch

    cfg = worker.vllm_config
    lengths = warmup_lengths(cfg.scheduler_config.max_num_batched_tokens, cfg.model_config.max_model_len)
    if lengths is None:
        logger.info("vllm-forge: serving warm-up skipped (batch or model length too small)")
        return
    steps = serving_steps(worker.model_runner, lengths)
    cpu_rng, cuda_rng = torch.random.get_rng_state(), torch.cuda.get_rng_state_all()
    t0 = time.perf_counter()
    try:
        for so in steps:
            worker.execute_model(so)
            if so.total_num_scheduled_tokens:
                worker.sample_tokens(None)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    except Exception:
        try:  # leave no warm-up request in the persistent batch
            steps[-1].finished_req_ids = set(WARMUP_IDS)
            worker.execute_model(steps[-1])
        except Exception:
            pass
        raise
    finally:
        torch.random.set_rng_state(cpu_rng)
        torch.cuda.set_rng_state_all(cuda_rng)
    logger.info("vllm-forge: serving warm-up: prefill of %d + %d tokens, 2 decode steps: %.2f s",
                lengths[0], lengths[1], time.perf_counter() - t0)


class _BeforeJitMonitor:
    """Runs `first` once when vLLM's warm-up starts its JIT monitor (so that what `first` compiles
    is not reported as a compile during inference), or at exit if it never did."""

    def __init__(self, first: Callable[[], None]) -> None:
        self.first, self.ran = first, False
        self.saved: list[tuple[Any, Any]] = []

    def run_first(self) -> None:
        if not self.ran:
            self.ran = True
            self.first()

    def __enter__(self) -> "_BeforeJitMonitor":
        import importlib
        for name in JIT_MONITORS:
            try:
                mod = importlib.import_module(name)
            except Exception:
                continue
            orig = getattr(mod, "activate", None)
            if orig is None:
                continue

            def activate(*a: Any, _orig: Any = orig, **k: Any) -> Any:
                self.run_first()
                return _orig(*a, **k)
            self.saved.append((mod, orig))
            mod.activate = activate
        return self

    def __exit__(self, *exc: Any) -> None:
        for mod, orig in self.saved:
            mod.activate = orig
        if exc[0] is None:
            self.run_first()


def _patch_worker(module: Any) -> None:
    def wrap(orig: Any) -> Callable[..., Any]:
        def compile_or_warm_up_model(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                fa4_warmup(self)
            except Exception as e:
                logger.warning("vllm-forge: FA4 start-up compile failed (%s: %s); kernels compile on first use",
                               type(e).__name__, e)

            def step() -> None:
                try:
                    serving_warmup(self)
                except Exception as e:
                    logger.warning("vllm-forge: serving warm-up failed (%s: %s); the first request pays its "
                                   "first-use costs", type(e).__name__, e)
            with _BeforeJitMonitor(step):
                return orig(self, *args, **kwargs)
        return compile_or_warm_up_model

    _hook(getattr(module, "Worker", None), "Worker.compile_or_warm_up_model", "no FA4 start-up compile", wrap)


def _patch_input_processor(module: Any) -> None:
    def wrap(orig: Any) -> Callable[..., None]:
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            orig(self, *args, **kwargs)
            if not _on("VLLM_FORGE_SERVING_WARMUP"):
                return
            try:  # what the first request's SamplingParams.verify would load (lru-cached by vLLM)
                from vllm import SamplingParams
                from vllm.v1.sample.logits_processor import validate_logits_processors_parameters

                validate_logits_processors_parameters(self.model_config.logits_processors, SamplingParams())
            except Exception as e:
                logger.debug("vllm-forge: logits-processor plugins not preloaded: %s", e)
        return __init__

    _hook(getattr(module, "InputProcessor", None), "InputProcessor.__init__", "no front-end warm-up", wrap)


# ---------------------------------------------------------------- wiring
PATCHES: dict[str, Callable[[Any], None]] = {
    "vllm.platforms.interface": _patch_platform,
    "vllm.v1.worker.gpu_worker": _patch_worker,
    "vllm.v1.engine.input_processor": _patch_input_processor,
}


class _AfterImport(importlib.abc.MetaPathFinder):
    """Patches a module right after it is first imported (no import of heavy modules here)."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None and spec.loader is not None:
                exec_module = spec.loader.exec_module

                def run(module: Any, _exec: Any = exec_module) -> None:
                    _exec(module)
                    _apply(fullname, module)

                spec.loader.exec_module = run  # type: ignore[method-assign]
                return spec
        return None


def _apply(name: str, module: Any) -> None:
    try:
        PATCHES[name](module)
    except Exception as e:
        logger.warning("vllm-forge: could not hook %s (%s); vLLM's behaviour kept", name, e)


def register() -> None:
    if not _on("VLLM_FORGE_RUNTIME"):
        return
    _setup_cache()
    if not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
    for name in PATCHES:
        if name in sys.modules:
            _apply(name, sys.modules[name])
