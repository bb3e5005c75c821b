#!/usr/bin/env python3
"""GPU validation of the flash-attention series of each FA pin (releases issue), one run, on an SM90 GPU.

  python scripts/gpu_series.py --bundle DIR [--pins bce2942,b273a02] [--jobs 6]

DIR is made by scripts/gpu_series_bundle.py: for each FA pin, trees/<pin7>/{before,after}/vllm/vllm_flash_attn/
(the release's own __init__.py + flash_attn_interface.py + cute/, stock and forged), and
runtime/<set>/ (that release's FA4 runtime packages, unpacked). Every side runs in its own process
with its tree and runtime first on sys.path, through vLLM's own `flash_attn_varlen_func(fa_version=4)`
(the compiled FA2/FA3 extensions are stubbed; FA4 needs none):

after (pin + series) -- the checks, each vs fp64 (rel L2 <= 1e-2, output poisoned with NaN first):
  kernel matrix: heads 512/256 x blocks 16/32/64 x GQA 8:1 (32/4) and 16:1 (32/2), a mixed
  prefill + decode batch, causal and not; q as vLLM hands it over (a strided view into a fused qkv
  buffer); a decode batch captured in a CUDA graph and replayed on new contents and lengths.
both sides -- the table: prefill 4x4096 and 1x16384 (causal), decode 64x8192; heads 512/256/128;
  blocks 16/64; 32 q / 4 kv heads, bf16, best of 5. Compilation of all pins runs in parallel
  (--jobs processes); every timed section holds one lock, so timings never overlap.

Writes $OUT/gpu_series.json (per pin: checks, table, runtime versions) and prints the table with
after/before ratios; exit status 1 if any check failed or a side crashed.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HQ = 32
CASES = {"prefill 4x4096": [(4096, 4096)] * 4, "prefill 1x16384": [(16384, 16384)],
         "decode 64x8192": [(1, 8192)] * 64}
MIXED = [(1, 1), (1, 77), (37, 300), (1, 1000), (129, 129), (5, 18), (1, 4099)]
LOCK = Path(os.environ.get("TMPDIR", "/tmp")) / "gpu_series.lock"


def child(side: str, checks: bool) -> dict[str, Any]:
    import torch
    from gpu_common import (
        best_ms,
        causal_flops,
        kv_bytes,
        make_paged,
        reference,
        rel_l2,
        stub_compiled_fa,
    )

    stub_compiled_fa()
    import vllm.vllm_flash_attn.flash_attn_interface as fi

    varlen = fi.flash_attn_varlen_func
    res: dict[str, Any] = {"side": side, "interface": fi.__file__, "checks": [], "table": []}

    def call(p: Any, out: torch.Tensor, hd: int, causal: bool = True, q: torch.Tensor | None = None) -> None:
        varlen(p.q if q is None else q, p.k_cache, p.v_cache, max_seqlen_q=p.max_q, cu_seqlens_q=p.cu_q,
               max_seqlen_k=p.max_kv, seqused_k=p.seqused_k, block_table=p.block_table, causal=causal,
               softmax_scale=hd ** -0.5, fa_version=4, out=out)

    def check(name: str, out: torch.Tensor, ref: torch.Tensor, t0: float) -> None:
        nan = bool(out.isnan().any())
        err = float("inf") if nan else rel_l2(out, ref)
        res["checks"].append({"name": name, "ok": err <= 1e-2, "rel_l2": err, "s": round(time.perf_counter() - t0, 1)})
        print(f"{'PASS' if err <= 1e-2 else 'FAIL'} {side} {name} rel_l2={err:.2e}", file=sys.stderr, flush=True)

    if checks:
        for hd in (512, 256):
            for block in (16, 32, 64):
                for hkv in (4, 2):
                    for causal in (True, False):
                        t0 = time.perf_counter()
                        p = make_paged(MIXED, (HQ, hkv), hd, block, seed=hd + block + hkv)
                        out = torch.full_like(p.q, float("nan"))
                        call(p, out, hd, causal)
                        torch.cuda.synchronize()
                        check(f"hd{hd} block{block} gqa{HQ // hkv}:1 {'causal' if causal else 'full'}", out,
                              reference(p, hd ** -0.5, causal), t0)
            for block in (16, 64):
                # q as vLLM's attention layer hands it over: a strided view into the fused qkv projection
                t0 = time.perf_counter()
                p = make_paged(MIXED, (HQ, 4), hd, block, seed=7)
                qkv = torch.randn(p.q.shape[0], (HQ + 2 * 4) * hd, device="cuda", dtype=p.q.dtype)
                q_view = qkv[:, :HQ * hd].view(-1, HQ, hd)
                q_view.copy_(p.q)
                assert not q_view.is_contiguous()
                out = torch.full_like(p.q, float("nan"))
                call(p, out, hd, True, q=q_view)
                torch.cuda.synchronize()
                check(f"hd{hd} block{block} strided q (fused qkv view)", out, reference(p, hd ** -0.5), t0)
                # a decode batch captured in a CUDA graph, replayed on new contents and lengths
                t0 = time.perf_counter()
                seqs = [(1, n) for n in (4099, 17, 1000, 64, 2048, 333, 1, 777)]
                p = make_paged(seqs, (HQ, 4), hd, block, seed=11)
                out = torch.empty_like(p.q)
                call(p, out, hd)  # compile outside the capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    call(p, out, hd)
                for trial in range(3):
                    g = torch.Generator(device="cuda")
                    g.manual_seed(100 + trial)
                    p.q.copy_(torch.randn(p.q.shape, generator=g, device="cuda", dtype=p.q.dtype))
                    p.k_cache.copy_(torch.randn(p.k_cache.shape, generator=g, device="cuda", dtype=p.q.dtype))
                    p.v_cache.copy_(torch.randn(p.v_cache.shape, generator=g, device="cuda", dtype=p.q.dtype))
                    new_lens = [max(1, n - 13 * (trial + 1)) for n in p.kv_lens]
                    p.seqused_k.copy_(torch.tensor(new_lens, dtype=torch.int32, device="cuda"))
                    p.kv_lens = new_lens
                    out.fill_(float("nan"))
                    graph.replay()
                    torch.cuda.synchronize()
                    check(f"hd{hd} block{block} CUDA graph decode replay {trial}", out, reference(p, hd ** -0.5), t0)
                del graph
    # the table: compile every variant first (no lock), then time them under the lock
    work = []
    for hd in (512, 256, 128):
        for block in (16, 64):
            for case, seqs in CASES.items():
                p = make_paged(seqs, (HQ, 4), hd, block, seed=0)
                out = torch.empty_like(p.q)
                call(p, out, hd)
                del p, out
                work.append((hd, block, case, seqs))
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for hd, block, case, seqs in work:
            p = make_paged(seqs, (HQ, 4), hd, block, seed=0)
            out = torch.empty_like(p.q)
            ms = best_ms(lambda: call(p, out, hd), 5 if "prefill" in case else 20, reps=5)  # noqa: B023
            res["table"].append({"head": hd, "block": block, "case": case, "ms": ms,
                                 "tflops": causal_flops(seqs, HQ, hd) / ms / 1e9,
                                 "tbs": kv_bytes(seqs, 4, hd) / ms / 1e9})
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        fcntl.flock(lock, fcntl.LOCK_UN)
    return res


def runtime_path(rt: Path) -> list[str]:
    """The runtime's own directory plus what its .pth files add (pip --target does not read them)."""
    paths = [str(rt)]
    for pth in sorted(rt.glob("*.pth")):
        for ln in pth.read_text().splitlines():
            if ln and not ln.startswith(("#", "import")):
                paths.append(str((rt / ln).resolve()))
    return paths


def run_side(bundle: Path, pin: str, spec: dict[str, Any], side: str, log: Path) -> dict[str, Any]:
    tree = bundle / "trees" / pin / side
    rt = bundle / "runtime" / spec["runtime"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), *runtime_path(rt), str(Path(__file__).parent)])}
    t0 = time.monotonic()
    with open(log, "w") as err:
        r = subprocess.run([sys.executable, __file__, "--child", side, "1" if side == "after" else "0"], env=env,
                           stdout=subprocess.PIPE, stderr=err, text=True, timeout=1500, check=False)
    if r.returncode != 0:
        return {"side": side, "crashed": r.returncode, "log_tail": log.read_text()[-3000:]}
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["wall_s"] = round(time.monotonic() - t0, 1)
    return res  # type: ignore[no-any-return]


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], sys.argv[3] == "1")))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--pins", help="comma-separated pin7s (default: all in the bundle's plan.json)")
    ap.add_argument("--jobs", type=int, default=6)
    args = ap.parse_args()
    plan = json.loads((args.bundle / "plan.json").read_text())
    pins = args.pins.split(",") if args.pins else sorted(plan)
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    import torch

    results: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "date": time.strftime("%Y-%m-%d"), "pins": {}}
    jobs = [(pin, side) for pin in pins for side in ("after", "before")]
    with ThreadPoolExecutor(args.jobs) as pool:
        futs = {job: pool.submit(run_side, args.bundle, job[0], plan[job[0]], job[1],
                                 out / f"log_{job[0]}_{job[1]}.txt") for job in jobs}
        for (pin, side), fut in futs.items():
            res = fut.result()
            results["pins"].setdefault(pin, {**plan[pin]})[side] = res
            print(f"{pin} {side}: {'crashed' if 'crashed' in res else 'done'} "
                  f"({res.get('wall_s', '-')} s)", flush=True)
            (out / "gpu_series.json").write_text(json.dumps(results, indent=1))
    failed = False
    for pin in pins:
        r = results["pins"][pin]
        a, b = r.get("after", {}), r.get("before", {})
        bad = [c["name"] for c in a.get("checks", []) if not c["ok"]]
        n = len(a.get("checks", []))
        crashed = [s for s in ("after", "before") if "crashed" in r.get(s, {})]
        r["passed"] = not bad and not crashed and n > 0
        failed |= not r["passed"]
        print(f"\n== {pin} (vLLM {r['release']}, runtime {r['runtime']}): checks {n - len(bad)}/{n} passed"
              + (f"; FAILED {bad[:6]}" if bad else "") + (f"; CRASHED {crashed}" if crashed else ""))
        before = {(x["head"], x["block"], x["case"]): x for x in b.get("table", [])}
        print(f"{'case':16} {'head':>4} {'blk':>3} | {'before':>8} | {'after':>8} | after/before time")
        for x in a.get("table", []):
            y = before.get((x["head"], x["block"], x["case"]))
            unit = "tbs" if "decode" in x["case"] else "tflops"
            if y:
                print(f"{x['case']:16} {x['head']:>4} {x['block']:>3} | {y[unit]:8.1f} | {x[unit]:8.1f} | "
                      f"{x['ms'] / y['ms']:.3f}")
    (out / "gpu_series.json").write_text(json.dumps(results, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
