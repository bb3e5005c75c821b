#!/usr/bin/env python3
"""Forged FA4 vs vLLM 0.19.1's Triton unified attention (what stock 0.19.x runs for head 512), same
inputs, one run, on the GPU. Run with the forged vllm/ package on PYTHONPATH.

  python scripts/gpu_bench.py [--quick]

Cases: prefill 4x4096 and 1x16384, decode 64x8192 and 8x32768; head 512 and 256; block 16 and 64;
32 q heads / 4 kv heads, bf16, causal, paged. Triton gets the 3D (split softmax) decode path set up
as vLLM 0.19.1's TritonAttentionMetadataBuilder does (seq_threshold_3D = 128 // kv_heads, 16
segments). Prints ms, TFLOP/s, TB/s (KV bytes read) and FA4/Triton ratios; writes $OUT/gpu_bench.json.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable
from typing import Any

import torch
import triton
from gpu_common import (
    best_ms,
    causal_flops,
    kv_bytes,
    make_paged,
    rel_l2,
    stub_compiled_fa,
    write_json,
)

HQ, HKV = 32, 4
CASES = {"prefill 4x4096": [(4096, 4096)] * 4, "prefill 1x16384": [(16384, 16384)],
         "decode 64x8192": [(1, 8192)] * 64, "decode 8x32768": [(1, 32768)] * 8}


def bench_case(case: str, seqs: list[tuple[int, int]], hd: int, block: int, varlen: Callable[..., Any],
               unified_attention: Callable[..., Any]) -> dict[str, Any]:
    p = make_paged(seqs, (HQ, HKV), hd, block, seed=0)
    scale = hd ** -0.5
    flops, kv_read = causal_flops(seqs, HQ, hd), kv_bytes(seqs, HKV, hd)
    out_fa, out_tr = torch.empty_like(p.q), torch.empty_like(p.q)
    threshold = 128 // HKV  # MIN_LAUNCH_GRID_SIZE_2D // num_kv_heads, as vLLM's builder
    segm = 16
    padded = triton.next_power_of_2(hd)
    segm_out = torch.empty(threshold, HQ, segm, padded, dtype=torch.float32, device="cuda")
    segm_max = torch.empty(threshold, HQ, segm, dtype=torch.float32, device="cuda")
    segm_sum = torch.empty(threshold, HQ, segm, dtype=torch.float32, device="cuda")
    one = torch.ones(len(seqs), HKV, dtype=torch.float32, device="cuda")

    def fa4() -> None:
        varlen(p.q, p.k_cache, p.v_cache, max_seqlen_q=p.max_q, cu_seqlens_q=p.cu_q, max_seqlen_k=p.max_kv,
               seqused_k=p.seqused_k, block_table=p.block_table, causal=True, softmax_scale=scale,
               fa_version=4, out=out_fa)

    def tri() -> None:
        unified_attention(q=p.q, k=p.k_cache, v=p.v_cache, out=out_tr, cu_seqlens_q=p.cu_q, max_seqlen_q=p.max_q,
                          seqused_k=p.seqused_k, max_seqlen_k=p.max_kv, softmax_scale=scale, causal=True,
                          window_size=(-1, -1), block_table=p.block_table, softcap=0, q_descale=None,
                          k_descale=one, v_descale=one, seq_threshold_3D=threshold,
                          num_par_softmax_segments=segm, softmax_segm_output=segm_out,
                          softmax_segm_max=segm_max, softmax_segm_expsum=segm_sum)

    iters = 5 if "prefill" in case else 20
    ms_fa, ms_tr = best_ms(fa4, iters), best_ms(tri, iters)
    diff = rel_l2(out_fa, out_tr.double())
    row = {"case": case, "head": hd, "block": block, "fa4_ms": ms_fa, "triton_ms": ms_tr,
           "fa4_tflops": flops / ms_fa / 1e9, "triton_tflops": flops / ms_tr / 1e9,
           "fa4_tbs": kv_read / ms_fa / 1e9, "triton_tbs": kv_read / ms_tr / 1e9,
           "fa4_over_triton_time": ms_fa / ms_tr, "rel_diff": diff}
    print(f"{case:17} {hd:>3} {block:>3} | {ms_fa:8.3f} {row['fa4_tflops']:7.0f} {row['fa4_tbs']:5.2f} | "
          f"{ms_tr:9.3f} {row['triton_tflops']:7.0f} {row['triton_tbs']:5.2f} | "
          f"{ms_fa / ms_tr:15.2f} {diff:8.1e}", flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="head 512, block 16 only")
    args = ap.parse_args()
    stub_compiled_fa()
    from vllm.v1.attention.ops.triton_unified_attention import unified_attention
    from vllm.vllm_flash_attn.flash_attn_interface import flash_attn_varlen_func

    rows: list[dict[str, Any]] = []
    heads = (512,) if args.quick else (512, 256)
    blocks = (16,) if args.quick else (16, 64)
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    print(f"{'case':17} {'hd':>3} {'blk':>3} | {'FA4 ms':>8} {'TFLOP/s':>7} {'TB/s':>5} | "
          f"{'Triton ms':>9} {'TFLOP/s':>7} {'TB/s':>5} | {'FA4/Triton time':>15} {'rel diff':>8}")
    for (case, seqs), hd, block in itertools.product(CASES.items(), heads, blocks):
        rows.append(bench_case(case, seqs, hd, block, flash_attn_varlen_func, unified_attention))
        torch.cuda.empty_cache()
    write_json("gpu_bench.json", {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                  "triton": triton.__version__, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
