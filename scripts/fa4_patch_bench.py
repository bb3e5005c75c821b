#!/usr/bin/env python3
"""Before/after table for a flash-attention patch (issue 6), one run, on the GPU machine.

  python scripts/fa4_patch_bench.py --before ROOT --after ROOT

ROOT: a directory holding a forged `vllm/` package (e.g. one built with the empty patch series and
one with patches/flash-attention). For each side and head dim (512, 256, 128) a fresh process puts
ROOT first on sys.path and calls vLLM's `flash_attn_varlen_func(..., fa_version=4)` with the
default configuration FA4 picks: correctness on a mixed prefill+decode paged batch vs fp64 (rel L2,
NaN) for blocks 16 and 64, causal and not, then prefill 4x4096 and 1x16384 (causal) and decode 64x8192, 32 q / 4 kv
heads, bf16, paged, best of 5; the rel L2 printed is the worse of causal and not. Sides alternate
per head dim. Writes $OUT/fa4_patch_bench.json and
prints ms, TFLOP/s (TB/s of KV for decode) and after/before.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

HQ, HKV = 32, 4
CASES = {"prefill 4x4096": [(4096, 4096)] * 4, "prefill 1x16384": [(16384, 16384)],
         "decode 64x8192": [(1, 8192)] * 64}
MIXED = [(1, 1), (1, 77), (37, 300), (129, 129), (5, 18), (1, 1000)]


def child(hd: int) -> None:
    import torch
    from gpu_common import (
        best_ms,
        causal_flops,
        kv_bytes,
        make_paged,
        paged_varlen,
        reference,
        rel_l2,
        stub_compiled_fa,
    )

    stub_compiled_fa()
    from vllm.vllm_flash_attn.flash_attn_interface import flash_attn_varlen_func

    def call(p: Any, out: torch.Tensor, causal: bool = True) -> None:
        paged_varlen(flash_attn_varlen_func, p, out, hd, causal)

    rows = []
    for block in (16, 64):
        errs = []
        for causal in (True, False):  # correctness gate: rel L2 vs fp64, NaN counts as failure
            p = make_paged(MIXED, (HQ, HKV), hd, block, seed=1)
            out = torch.full_like(p.q, float("nan"))
            call(p, out, causal)
            torch.cuda.synchronize()
            errs.append(float("inf") if out.isnan().any() else rel_l2(out, reference(p, hd ** -0.5, causal)))
        err = max(errs)
        for case, seqs in CASES.items():
            p = make_paged(seqs, (HQ, HKV), hd, block, seed=0)
            out = torch.empty_like(p.q)
            best = best_ms(lambda: call(p, out), 5 if "prefill" in case else 20, reps=5)  # noqa: B023
            rows.append({"head": hd, "block": block, "case": case, "ms": best,
                         "tflops": causal_flops(seqs, HQ, hd) / best / 1e9,
                         "tbs": kv_bytes(seqs, HKV, hd) / best / 1e9, "rel_l2": err})
    print(json.dumps(rows))


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(int(sys.argv[2]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", type=Path, required=True)
    ap.add_argument("--after", type=Path, required=True)
    ap.add_argument("--heads", default="512,256,128")
    args = ap.parse_args()
    out_dir = Path(os.environ.get("OUT", "out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    for hd in [int(h) for h in args.heads.split(",")]:
        for side in ("before", "after"):
            root = getattr(args, side)
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
            r = subprocess.run([sys.executable, __file__, "--child", str(hd)], env=env, capture_output=True,
                               text=True, timeout=600)
            if r.returncode != 0:
                print(f"{side} head {hd} failed:\n{r.stderr[-3000:]}", flush=True)
                continue
            results[side] += json.loads(r.stdout.strip().splitlines()[-1])
            (out_dir / "fa4_patch_bench.json").write_text(json.dumps(results, indent=1))
    key = lambda r: (r["head"], r["block"], r["case"])  # noqa: E731
    after = {key(r): r for r in results["after"]}
    print(f"{'case':16} {'head':>4} {'blk':>3} | {'before ms':>9} {'TF/s|TB/s':>9} | {'after ms':>9} {'TF/s|TB/s':>9}"
          f" | {'after/before time':>17} | rel L2 before, after")
    for b in results["before"]:
        a = after.get(key(b))
        if a is None:
            continue
        unit = "tbs" if "decode" in b["case"] else "tflops"
        print(f"{b['case']:16} {b['head']:>4} {b['block']:>3} | {b['ms']:9.3f} {b[unit]:9.2f} | {a['ms']:9.3f} "
              f"{a[unit]:9.2f} | {a['ms'] / b['ms']:17.3f} | {b['rel_l2']:.2e}, {a['rel_l2']:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
