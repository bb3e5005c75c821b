#!/usr/bin/env python3
"""FA4 SM90 forward config search for head dim 512 (issue 6), on the GPU, with the forged vllm/ on PYTHONPATH.

  python scripts/fa4_sm90_search.py [--budget-s 480]

For each candidate (tile_m, tile_n, mma_pv_is_rs, intra_wg_overlap) of FA4's `_flash_attn_fwd`:
correctness first (mixed prefill+decode paged batch, block 16 and 64, causal, vs fp64: rel L2 <= 1e-2,
no NaN), then prefill 4x4096 causal paged (block 64, 32 q / 4 kv heads, bf16) in TFLOP/s. Candidates
that do not compile are recorded with the compiler's message (e.g. shared-memory overflow).
Each candidate runs in its own process: a kernel that faults (illegal address) poisons its CUDA
context, and must not take the next candidates with it. Writes $OUT/fa4_sm90_search.json after
every candidate; prints a table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
from typing import Any

import torch
from gpu_common import (
    best_ms,
    causal_flops,
    make_paged,
    reference,
    rel_l2,
    stub_compiled_fa,
    write_json,
)

HD, HEADS = 512, (32, 4)
MIXED = [(1, 1), (1, 77), (37, 300), (129, 129), (5, 18), (1, 1000)]
DEFAULT = (64, 64, False, True)  # the pin's FwdConfig for head dim > 256
CANDIDATES = [DEFAULT, (64, 64, True, True), (64, 80, False, True), (64, 96, False, True), (64, 128, False, True),
              (64, 48, False, True), (64, 32, False, True), (128, 32, False, True), (128, 64, False, True),
              (96, 64, False, True), (64, 64, False, False), (128, 32, True, True), (64, 96, True, True),
              (64, 128, True, True)]


def one(tm: int, tn: int, rs: bool, ol: bool) -> dict[str, Any]:
    stub_compiled_fa()
    from vllm.vllm_flash_attn.cute.interface import _flash_attn_fwd

    bench = make_paged([(4096, 4096)] * 4, HEADS, HD, 64, seed=0)
    flops = causal_flops([(4096, 4096)] * 4, HEADS[0], HD)
    kw = dict(tile_mn=(tm, tn), mma_pv_is_rs=rs, intra_wg_overlap=ol)

    def run(p: Any, out: torch.Tensor, kw: dict[str, Any] = kw) -> None:
        _flash_attn_fwd(p.q, p.k_cache, p.v_cache, cu_seqlens_q=p.cu_q, seqused_k=p.seqused_k,
                        max_seqlen_q=p.max_q, max_seqlen_k=p.max_kv, page_table=p.block_table,
                        softmax_scale=HD ** -0.5, causal=True, out=out, **kw)

    # one stage of Q (tm x d), K and V (tn x d each) in bf16, plus P when it goes through smem (not RS)
    smem = (tm * HD + 2 * tn * HD + (0 if rs else tm * tn)) * 2
    row: dict[str, Any] = {"config": [tm, tn, rs, ol], "smem_estimate_kib": smem // 1024}
    try:
        errs = []
        for block in (16, 64):
            p = make_paged(MIXED, HEADS, HD, block)
            out = torch.full_like(p.q, float("nan"))
            run(p, out)
            torch.cuda.synchronize()
            errs.append(rel_l2(out, reference(p, HD ** -0.5)) if not out.isnan().any() else float("nan"))
        row["rel_l2"] = errs
        if not all(e <= 1e-2 for e in errs):
            row["status"] = "incorrect"
        else:
            out = torch.empty_like(bench.q)
            ms = best_ms(lambda: run(bench, out), 10)
            row.update(status="ok", ms=ms, tflops=flops / ms / 1e9)
    except Exception as e:  # compile or launch failure: keep the evidence
        row.update(status="failed", error=f"{type(e).__name__}: {str(e)[:600]}",
                   trace=traceback.format_exc()[-1200:])
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-s", type=float, default=480)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # tm,tn,rs,ol: run one candidate, print its JSON row
    args = ap.parse_args()
    if args.one:
        tm, tn, rs, ol = args.one.split(",")
        print("ROW " + json.dumps(one(int(tm), int(tn), rs == "True", ol == "True")))
        return 0
    t_start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for tm, tn, rs, ol in CANDIDATES:
        left = args.budget_s - (time.perf_counter() - t_start)
        if left < 20:
            rows.append({"config": [tm, tn, rs, ol], "status": "not tried (time budget)"})
            continue
        try:
            r = subprocess.run([sys.executable, __file__, "--one", f"{tm},{tn},{rs},{ol}"], capture_output=True,
                               text=True, timeout=left)
            found = [ln[4:] for ln in r.stdout.splitlines() if ln.startswith("ROW ")]
            row = json.loads(found[0]) if found else {"config": [tm, tn, rs, ol], "status": "crashed",
                                                      "error": (r.stderr or r.stdout)[-600:]}
        except subprocess.TimeoutExpired:
            row = {"config": [tm, tn, rs, ol], "status": "timeout"}
        rows.append(row)
        print(f"{tm:4} {tn:4} rs={rs!s:5} ol={ol!s:5} smem~{row.get('smem_estimate_kib', '?')!s:>4}KiB "
              f"{row['status']:10} "
              f"{row.get('tflops', 0):6.0f} TFLOP/s  {row.get('error', '')[:160]}", flush=True)
        write_json("fa4_sm90_search.json", {"device": torch.cuda.get_device_name(), "rows": rows})
    best = max((r for r in rows if r.get("status") == "ok"), key=lambda r: r["tflops"], default=None)
    print(f"best: {best}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
