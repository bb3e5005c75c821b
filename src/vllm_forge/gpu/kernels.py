"""Paged attention inputs, the float64 reference and CUDA timing (torch: imported by GPU commands only)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Paged:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    cu_q: torch.Tensor
    seqused_k: torch.Tensor
    block_table: torch.Tensor
    q_lens: list[int]
    kv_lens: list[int]
    descale: torch.Tensor | None = None  # fp8 KV: per (sequence, kv head) scale of K and V

    @property
    def max_q(self) -> int:
        return max(self.q_lens)

    @property
    def max_kv(self) -> int:
        return max(self.kv_lens)


def make_paged(seqs: list[tuple[int, int]], heads: tuple[int, int], head_dim: int, block: int,
               dtype: torch.dtype = torch.bfloat16, seed: int | None = None, fp8: bool = False) -> Paged:
    """Fresh random inputs; the KV of each sequence lives in randomly chosen, non-contiguous pages.
    fp8: K and V stored as float8_e4m3fn with a descale per (sequence, kv head)."""
    g = torch.Generator(device="cuda")
    g.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))
    hq, hkv = heads
    q_lens, kv_lens = [s[0] for s in seqs], [s[1] for s in seqs]
    pages = [math.ceil(kv / block) for kv in kv_lens]
    num_blocks = sum(pages) + 7
    perm = torch.randperm(num_blocks, generator=g, device="cuda").to(torch.int32)
    table = torch.zeros(len(seqs), max(pages), dtype=torch.int32, device="cuda")
    used = 0
    for i, n in enumerate(pages):
        table[i, :n] = perm[used:used + n]
        used += n
    k = torch.randn(num_blocks, block, hkv, head_dim, generator=g, device="cuda", dtype=dtype)
    v = torch.randn(num_blocks, block, hkv, head_dim, generator=g, device="cuda", dtype=dtype)
    descale = None
    if fp8:  # values within e4m3's range; the descale brings them back to the bf16 scale
        descale = torch.rand(len(seqs), hkv, generator=g, device="cuda") * 0.1 + 0.05
        k, v = (k * 8).to(torch.float8_e4m3fn), (v * 8).to(torch.float8_e4m3fn)
    return Paged(
        q=torch.randn(sum(q_lens), hq, head_dim, generator=g, device="cuda", dtype=dtype), k_cache=k, v_cache=v,
        cu_q=torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda"),
        seqused_k=torch.tensor(kv_lens, dtype=torch.int32, device="cuda"),
        block_table=table, q_lens=q_lens, kv_lens=kv_lens, descale=descale)


def paged_varlen(varlen: Callable[..., object], p: Paged, out: torch.Tensor, head_dim: int, causal: bool = True,
                 q: torch.Tensor | None = None, window: int | None = None) -> None:
    """One call of a `flash_attn_varlen_func` with FA4 on a paged batch, as vLLM's backend makes it
    (q: another view of the queries, e.g. strided into a fused qkv buffer; window: a causal sliding
    window of that many keys, vLLM's window_size=[window - 1, 0])."""
    kw: dict[str, Any] = {}
    if window is not None:
        kw["window_size"] = [window - 1, 0]
    if p.descale is not None:
        kw["k_descale"] = kw["v_descale"] = p.descale
    varlen(p.q if q is None else q, p.k_cache, p.v_cache, max_seqlen_q=p.max_q, cu_seqlens_q=p.cu_q,
           max_seqlen_k=p.max_kv, seqused_k=p.seqused_k, block_table=p.block_table, causal=causal,
           softmax_scale=head_dim ** -0.5, fa_version=4, out=out, **kw)


def reference(p: Paged, scale: float, causal: bool = True, window: int | None = None) -> torch.Tensor:
    """Paged attention in float64; causal: queries aligned to the end of each sequence."""
    hq, hkv = p.q.shape[1], p.k_cache.shape[2]
    block = p.k_cache.shape[1]
    out = torch.empty(p.q.shape, dtype=torch.float64, device="cuda")
    start = 0
    # fp8 caches: widened before they are indexed (not every indexing kernel takes float8)
    kc, vc = (p.k_cache, p.v_cache) if p.descale is None else (p.k_cache.float(), p.v_cache.float())
    for i, (ql, kl) in enumerate(zip(p.q_lens, p.kv_lens, strict=True)):
        blocks = p.block_table[i, :math.ceil(kl / block)].long()
        k = kc[blocks].reshape(-1, hkv, kc.shape[-1])[:kl].double()
        v = vc[blocks].reshape(-1, hkv, vc.shape[-1])[:kl].double()
        if p.descale is not None:
            k, v = k * p.descale[i].double()[None, :, None], v * p.descale[i].double()[None, :, None]
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
        q = p.q[start:start + ql].double()
        s = torch.einsum("qhd,khd->hqk", q, k) * scale
        qi = torch.arange(ql, device="cuda")[:, None] + (kl - ql)
        kj = torch.arange(kl, device="cuda")[None, :]
        if causal:
            s.masked_fill_(kj > qi, float("-inf"))
        if window is not None:
            s.masked_fill_(kj < qi - (window - 1), float("-inf"))
        out[start:start + ql] = torch.einsum("hqk,khd->qhd", s.softmax(-1), v)
        start += ql
    return out


def best_ms(fn: Callable[[], object], iters: int, reps: int = 1) -> float:
    """The best of `reps` runs of `iters` calls, timed with CUDA events: milliseconds per call."""
    fn()
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    best = float("inf")
    for _ in range(reps):
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / iters)
    return best


def graph_of(fn: Callable[[], object], iters: int) -> torch.cuda.CUDAGraph:
    """`iters` calls of fn captured in one CUDA graph (kernel time without Python launch overhead)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    return graph


def causal_flops(seqs: list[tuple[int, int]], hq: int, hd: int) -> float:
    """QK^T and PV flops of causal attention, queries aligned to the end of each sequence."""
    return sum(4 * hq * hd * (q * (k - q) + q * (q + 1) / 2) for q, k in seqs)


def kv_bytes(seqs: list[tuple[int, int]], hkv: int, hd: int) -> int:
    """K and V bytes read (bf16)."""
    return sum(2 * k * hkv * hd * 2 for _, k in seqs)


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    if bool(out.isnan().any()):
        return float("inf")
    return float((out.double() - ref).norm() / ref.norm())
