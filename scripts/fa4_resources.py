#!/usr/bin/env python3
"""The compiler's resource report for FA4's SM90 forward kernels (issue 6), on the GPU machine.

  OUT=out python scripts/fa4_resources.py

For head dim 512 (the pin's FwdConfig(64, 64, False, True) and its RS variant) and, for
comparison, 256 and 128 (the pin's defaults): a fresh process JIT-compiles the paged causal
forward with CUTE_DSL_KEEP_CUBIN/KEEP_PTX into $OUT/res/<case>/, times prefill 4x4096 (32 q / 4 kv
heads, bf16, block 64), then the parent reads each cubin with the CUDA tools bundled with triton:
`cuobjdump --dump-resource-usage` (registers, shared, local = spill stack), `ptxas -v` on the PTX
(spill bytes), and the SASS's warpgroup MMA instructions by shape (HGMMA.64xNx16), which show how
many tensor-core operations the kernel issues per key block, against the useful work.
Writes $OUT/fa4_resources.json and prints a table.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

OUT = Path(os.environ.get("OUT", "out"))
CASES = {"hd512": (512, (64, 64, False, True)), "hd512-rs": (512, (64, 64, True, True)),
         "hd256": (256, None), "hd128": (128, None)}
HEADS = (32, 4)


def child(case: str) -> None:
    import torch
    from gpu_common import best_ms, causal_flops, make_paged, stub_compiled_fa

    stub_compiled_fa()
    from vllm.vllm_flash_attn.cute.interface import _flash_attn_fwd

    hd, cfg = CASES[case]
    kw: dict[str, Any] = {}
    if cfg:
        kw = dict(tile_mn=cfg[:2], mma_pv_is_rs=cfg[2], intra_wg_overlap=cfg[3])
    p = make_paged([(4096, 4096)] * 4, HEADS, hd, 64, seed=0)
    out = torch.empty_like(p.q)

    def run() -> None:
        _flash_attn_fwd(p.q, p.k_cache, p.v_cache, cu_seqlens_q=p.cu_q, seqused_k=p.seqused_k,
                        max_seqlen_q=p.max_q, max_seqlen_k=p.max_kv, page_table=p.block_table,
                        softmax_scale=hd ** -0.5, causal=True, out=out, **kw)

    ms = best_ms(run, 10, reps=5)
    flops = causal_flops([(4096, 4096)] * 4, HEADS[0], hd)
    print(json.dumps({"ms": ms, "tflops": flops / ms / 1e9}))


def tool(name: str) -> str | None:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.exists() else None


def analyse(dump: Path) -> dict[str, Any]:
    res: dict[str, Any] = {"files": sorted(p.name for p in dump.rglob("*") if p.is_file())}
    cubins = [p for p in dump.rglob("*.cubin") if "fwd" in p.name.lower() or "flash" in p.name.lower()] \
        or list(dump.rglob("*.cubin"))
    cuobjdump, ptxas = tool("cuobjdump"), tool("ptxas")
    for cubin in cubins:
        entry: dict[str, Any] = {}
        if cuobjdump:
            r = subprocess.run([cuobjdump, "--dump-resource-usage", str(cubin)], capture_output=True, text=True)
            entry["resource_usage"] = [ln.strip() for ln in r.stdout.splitlines() if "REG" in ln or "Function" in ln]
            sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True).stdout
            entry["hgmma"] = dict(Counter(m.group(1) for m in re.finditer(r"(HGMMA\.\S+)", sass)))
            entry["local_mem_ops"] = len(re.findall(r"\b(?:STL|LDL)\b", sass))
        res[cubin.name] = entry
    for ptx in dump.rglob("*.ptx"):
        if ptxas:
            r = subprocess.run([ptxas, "-arch=sm_90a", "-v", str(ptx), "-o", os.devnull], capture_output=True,
                               text=True)
            res.setdefault(ptx.name, {})["ptxas_v"] = [ln for ln in (r.stderr + r.stdout).splitlines()
                                                       if "ptxas info" in ln or "spill" in ln or "error" in ln]
    return res


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(sys.argv[2])
        return 0
    results: dict[str, Any] = {}
    for case in CASES:
        dump = OUT / "res" / case
        dump.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "CUTE_DSL_KEEP_CUBIN": "1", "CUTE_DSL_KEEP_PTX": "1", "CUTE_DSL_DUMP_DIR": str(dump),
               "CUTE_DSL_LINEINFO": "1"}
        r = subprocess.run([sys.executable, __file__, "--child", case], env=env, capture_output=True, text=True,
                           timeout=300)
        row: dict[str, Any] = {"returncode": r.returncode}
        if r.returncode == 0:
            row.update(json.loads(r.stdout.strip().splitlines()[-1]))
        else:
            row["stderr_tail"] = r.stderr[-2000:]
        row.update(analyse(dump))
        results[case] = row
        (OUT / "fa4_resources.json").write_text(json.dumps(results, indent=1))
        print(case, json.dumps(row, indent=1)[:3000], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
