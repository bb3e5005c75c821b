#!/usr/bin/env python3
"""Head-512 kernel work on the H100: time kernel variants side by side in one process, and profile one.

  python3 scripts/gpu_hd512.py time --bundle /tmp/gs --pin bce2942[,b273a02|all] [--variant NAME=DIR ...]
                                     [--shapes 4x4096,1x16384] [--graph-only]
  python3 scripts/gpu_hd512.py ncu  --bundle /tmp/gs --pin bce2942[,...|all] --side after --shapes 4x4096 [--variant NAME=DIR]
  python scripts/gpu_hd512.py record DATA_DIR      (here: each series' `validation.kernel` in the manifest)

The bundle is scripts/gpu_series_bundle.py's, unpacked on the GPU machine without its run
(`GPU_SERIES_NORUN=1 python3 scripts/gpu_series_device.py carry ...`): trees/<pin>/{before,after}
and the release's own FA4 runtime. A variant is the `after` tree (pin + series) with the files of DIR
laid over its cute/ (DIR mirrors cute/: e.g. DIR/flash_fwd_sm90.py). Every side is imported as a
package of its own (vllm = after, vllmb = before, vllmv0.. = variants) through vLLM's own
`flash_attn_varlen_func(fa_version=4)`; each shape is timed side after side, three rounds, best of
each (CUDA-graph replay of 5 calls, and eager), so every ratio printed comes from one run. The SM
clock and power are sampled with nvidia-smi while timing. Each side's kernel is first checked
against fp64 on a small causal batch.

`time` also fits, per side, t = a * (n-block iterations) + b * (tiles) over the causal shapes: `a` is the
main loop's cost per 64x64 block, `b` what each 64-row tile costs beyond it (launch, Q load, epilogue).
`ncu` runs Nsight Compute (`--clock-control none`, the device's clocks are left alone) on the second
call of one side and shape, writes its details page to $OUT and prints the kernel's duration as
TFLOP/s (one launch, no harness around it). Several pins run one after the other, each in its own
process with its own runtime.

`record` reads what a run left in DATA_DIR (the bundle's plan.json, the `time` output as
time_all_pins.log, the `ncu` output as ncu_all_pins.log, and the `time` output at heads 256/128
(GPU_HD512_HEAD) as time_heads_256_128.log) and writes, per series, the head-512 block-64 kernel timing
and the releases issue's goals: 480 TFLOP/s at 4x4096, judged on the ncu duration of one launch (no
harness around the kernel), and heads 256/128 within 2% of the pin, into
patches/flash-attention/manifest.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from gpu_series import renamed_tree, runtime_path, time_case

HQ, HKV, TILE = 32, 4, 64
# head dim and page size: 512 and 64 (the series' case) unless GPU_HD512_HEAD / GPU_HD512_BLOCK say
# otherwise (e.g. heads 256/128, whose kernels the series leaves as they are)
HD, BLOCK = int(os.environ.get("GPU_HD512_HEAD", "512")), int(os.environ.get("GPU_HD512_BLOCK", "64"))
TAG = "" if (HD, BLOCK) == (512, 64) else f"_hd{HD}b{BLOCK}"


def shape(name: str) -> list[tuple[int, int]]:
    """'4x4096' -> four causal prefills of 4096 tokens; 'nc4x4096' is the same without the causal mask."""
    n, s = name.removeprefix("nc").split("x")
    return [(int(s), int(s))] * int(n)


def work(seqs: list[tuple[int, int]], causal: bool) -> tuple[int, int]:
    """(64x64 block iterations, 64-row tiles) of the kernel for these sequences."""
    tiles = iters = 0
    for q, k in seqs:
        for m in range(math.ceil(q / TILE)):
            tiles += HQ
            last = min(k, k - q + (m + 1) * TILE) if causal else k
            iters += HQ * math.ceil(last / TILE)
    return iters, tiles


def child(sides: list[str], shapes: list[str], calls: int, ncu: bool, eager_too: bool = True) -> dict[str, Any]:
    import importlib
    import types

    import torch
    from gpu_common import (
        best_ms,
        make_paged,
        paged_varlen,
        reference,
        rel_l2,
        stub_compiled_fa,
    )

    stub_compiled_fa()
    fns = {}
    for side in sides:
        pkg = "vllm" if side == "after" else ("vllmb" if side == "before" else f"vllm{side}")
        for ext in ("_vllm_fa2_C", "_vllm_fa3_C"):
            sys.modules.setdefault(f"{pkg}.vllm_flash_attn.{ext}", types.ModuleType(ext))
        mod = importlib.import_module(f"{pkg}.vllm_flash_attn.flash_attn_interface")
        fns[side] = partial(paged_varlen, mod.flash_attn_varlen_func)
    res: dict[str, Any] = {"checks": {}, "rows": []}
    if ncu:  # the profiled call is the second one (the first compiles)
        (side,) = sides
        p = make_paged(shape(shapes[0]), (HQ, HKV), HD, BLOCK, seed=0)
        out = torch.empty_like(p.q)
        for _ in range(calls):
            fns[side](p, out, HD, not shapes[0].startswith("nc"))
        torch.cuda.synchronize()
        return res
    for side, call in fns.items():
        p = make_paged([(1, 1), (37, 300), (129, 129), (64, 64), (200, 4099)], (HQ, HKV), HD, BLOCK, seed=3)
        out = torch.full_like(p.q, float("nan"))
        call(p, out, HD)
        torch.cuda.synchronize()
        err = rel_l2(out, reference(p, HD ** -0.5)) if not out.isnan().any() else float("inf")
        res["checks"][side] = err
        print(f"{'PASS' if err <= 1e-2 else 'FAIL'} {side} rel_l2={err:.2e}", file=sys.stderr, flush=True)
    for name in shapes:
        seqs, causal = shape(name), not name.startswith("nc")
        p = make_paged(seqs, (HQ, HKV), HD, BLOCK, seed=0)
        for call in fns.values():  # compile every side before timing any
            call(p, torch.empty_like(p.q), HD, causal)
        torch.cuda.synchronize()
        graph = {s: float("inf") for s in fns}
        eager = {s: float("inf") for s in fns}
        for _ in range(3):
            for s, call in fns.items():
                c = partial(call, causal=causal) if not causal else call
                graph[s] = min(graph[s], time_case(c, p, HD, 5))
                if eager_too:
                    out = torch.empty_like(p.q)
                    eager[s] = min(eager[s], best_ms(lambda c=c, p=p, out=out: c(p, out, HD), 5, reps=3))
        work_flops = flops(name)
        iters, tiles = work(seqs, causal)
        for s in fns:
            res["rows"].append({"side": s, "shape": name, "graph_ms": graph[s], "eager_ms": eager[s],
                                "tflops": work_flops / graph[s] / 1e9, "tflops_eager": work_flops / eager[s] / 1e9,
                                "iters": iters, "tiles": tiles, "causal": causal})
        print(f"{name}: " + "  ".join(f"{s} {work_flops / graph[s] / 1e9:.1f}/{work_flops / eager[s] / 1e9:.1f}"
                                      for s in fns), file=sys.stderr, flush=True)
        del p
        torch.cuda.empty_cache()
    return res


def fit(rows: list[dict[str, Any]]) -> tuple[float, float] | None:
    """Least squares t = a * iters + b * tiles (microseconds) over the causal rows of one side."""
    pts = [(r["iters"], r["tiles"], r["graph_ms"] * 1e3) for r in rows if r["causal"]]
    if len(pts) < 2:
        return None
    sxx = sum(x * x for x, _, _ in pts)
    syy = sum(y * y for _, y, _ in pts)
    sxy = sum(x * y for x, y, _ in pts)
    sxt = sum(x * t for x, _, t in pts)
    syt = sum(y * t for _, y, t in pts)
    det = sxx * syy - sxy * sxy
    if abs(det) < 1e-9:
        return None
    return (sxt * syy - syt * sxy) / det, (sxx * syt - sxy * sxt) / det


def prepare(bundle: Path, pin: str, variants: list[str]) -> tuple[list[str], list[str]]:
    """PYTHONPATH entries and side names: after (vllm), before (vllmb), each variant (vllmv<i>)."""
    plan = json.loads((bundle / "plan.json").read_text())
    trees = bundle / "trees" / pin
    path = [str(trees / "after"), str(renamed_tree(trees / "before", trees / "before_ab"))]
    sides = ["after", "before"]
    for i, spec in enumerate(variants):
        name, src = spec.split("=", 1)
        dest = trees / f"var-{name}"
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(trees / "after", dest / "base")
        cute = dest / "base" / "vllm" / "vllm_flash_attn" / "cute"
        for f in Path(src).rglob("*.py"):
            shutil.copy(f, cute / f.relative_to(src))
        renamed_tree(dest / "base", dest / "pkg", package=f"vllmv{i}")
        path.append(str(dest / "pkg"))
        sides.append(f"v{i}")
    path += [*runtime_path(bundle / "runtime" / plan[pin]["runtime"]), str(HERE)]
    return path, sides


def flops(name: str) -> float:
    from gpu_common import causal_flops

    seqs = shape(name)
    return sum(4 * HQ * HD * q * k for q, k in seqs) if name.startswith("nc") else causal_flops(seqs, HQ, HD)


def run_pin(args: argparse.Namespace, pin: str, out: Path) -> int:
    path, sides = prepare(args.bundle, pin, args.variant)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    names = {s: (s if s in ("after", "before") else args.variant[int(s[1:])].split("=")[0]) for s in sides}
    if args.mode == "ncu":
        rep = out / f"ncu_{pin}_{names[args.side]}_{args.shapes}"
        cmd = ["ncu", "--clock-control", "none", "-k", "regex:FlashAttention", "--launch-skip", "1",
               "--launch-count", "1", "--set", "full", "--import-source", "no", "-f", "-o", str(rep),
               sys.executable, __file__, "--child", args.side, args.shapes, "2", "1", "1"]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            print(r.stdout[-3000:], r.stderr[-3000:])
            return r.returncode
        page = subprocess.run(["ncu", "-i", f"{rep}.ncu-rep", "--page", "details"], capture_output=True,
                              text=True, check=False).stdout
        (out / f"{rep.name}.txt").write_text(page)
        got = {ln.split()[0]: ln.split() for ln in page.splitlines() if ln.strip().startswith(("Duration", "SM Frequency"))}
        ms = float(got["Duration"][-1]) * {"ms": 1.0, "us": 1e-3, "usecond": 1e-3, "msecond": 1.0}[got["Duration"][-2]]
        print(f"ncu {pin} {names[args.side]} {args.shapes}: {ms:.3f} ms at {got['SM'][-1]} GHz -> "
              f"{flops(args.shapes) / ms / 1e9:.1f} TFLOP/s")
        return 0
    query = "--query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active"
    t0 = time.monotonic()
    with open(out / f"smi_{pin}{TAG}.csv", "w") as smi_log:
        smi = subprocess.Popen(["nvidia-smi", query, "--format=csv,noheader", "-lms", "200"], stdout=smi_log,
                               stderr=subprocess.DEVNULL)
        r = subprocess.run([sys.executable, __file__, "--child", ",".join(sides), args.shapes, "1", "0",
                            "0" if args.graph_only else "1"], env=env, stdout=subprocess.PIPE, text=True, check=False)
        smi.terminate()
    if r.returncode != 0:
        print(f"{pin}: child failed ({r.returncode})")
        return 1
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["variants"], res["wall_s"] = args.variant, round(time.monotonic() - t0, 1)
    (out / f"hd512_{pin}{TAG}.json").write_text(json.dumps(res, indent=1))
    clocks = sorted(int(ln.split(",")[1].split()[0]) for ln in (out / f"smi_{pin}{TAG}.csv").read_text().splitlines()
                    if ln.count(",") >= 4 and ln.split(",")[1].strip().split()[0].isdigit())
    print(f"== {pin} ({json.loads((args.bundle / 'plan.json').read_text())[pin]['runtime']}) head {HD} block {BLOCK}")
    if clocks:
        print(f"SM clock while running: min {clocks[0]} median {clocks[len(clocks) // 2]} max {clocks[-1]} MHz")
    print("checks (rel L2 vs fp64): " + ", ".join(f"{names[s]} {e:.1e}" for s, e in res["checks"].items()))
    base = {r["shape"]: r for r in res["rows"] if r["side"] == "after"}
    print(f"{'shape':10} {'side':14} {'TFLOP/s graph':>13} {'eager':>7} {'t/after':>8}")
    for row in res["rows"]:
        print(f"{row['shape']:10} {names[row['side']]:14} {row['tflops']:13.1f} {row['tflops_eager']:7.1f} "
              f"{row['graph_ms'] / base[row['shape']]['graph_ms']:8.3f}")
    for s in sides:
        ab = fit([r for r in res["rows"] if r["side"] == s])
        if ab:
            print(f"fit {names[s]}: {ab[0] * 1e3:.2f} ns per block iteration, {ab[1] * 1e3:.1f} ns per tile")
    return 0 if all(e <= 1e-2 for e in res["checks"].values()) else 1


def parse_time_log(log: Path, pins: dict[str, dict[str, Any]], key: str) -> None:
    """Rows of a `time` log into pins[pin][key][(head, block, shape, side)] = (graph, eager)."""
    cur: dict[str, Any] = {}
    for ln in log.read_text().splitlines():
        f = ln.split()
        if ln.startswith("== "):
            cur = pins.setdefault(f[1], {"runtime": f[2].strip("()"), "rows": {}, "heads": {}, "ncu": {}})
            head, block = (int(f[4]), int(f[6])) if len(f) >= 7 else (512, 64)
        elif ln.startswith("SM clock") and key == "rows":
            cur["clock"] = ln.split(": ", 1)[1]
        elif len(f) == 5 and f[1] in ("after", "before"):
            cur[key][(head, block, f[0], f[1])] = (float(f[2]), float(f[3]))


def parse_logs(data: Path) -> dict[str, dict[str, Any]]:
    """Per pin: {'runtime', 'clock', 'rows' and 'heads': {(head, block, shape, side): (graph, eager)},
    'ncu': {shape: (ms, ghz, tflops)}}."""
    pins: dict[str, dict[str, Any]] = {}
    parse_time_log(data / "time_all_pins.log", pins, "rows")
    if (data / "time_heads_256_128.log").is_file():
        parse_time_log(data / "time_heads_256_128.log", pins, "heads")
    for ln in (data / "ncu_all_pins.log").read_text().splitlines():
        f = ln.split()  # ncu PIN SIDE SHAPE: MS ms at GHZ GHz -> TFLOPS TFLOP/s
        if ln.startswith("ncu ") and f[2] == "after":
            pins[f[1]]["ncu"][f[3].rstrip(":")] = (float(f[4]), float(f[7]), float(f[10]))
    return pins


def record(data: Path, root: Path | None = None) -> None:
    """validation.kernel of each measured series (see the module docstring); root: the series
    directory (default: the tool's patches/flash-attention)."""
    sys.path.insert(0, str(HERE.parent / "src"))
    from vllm_forge.series import read_manifest, write_manifest

    plan = json.loads((data / "plan.json").read_text())
    manifest = read_manifest(root)
    for pin, got in sorted(parse_logs(data).items()):
        entry = manifest["series"][plan[pin]["tree_sha256"]]
        if entry.get("validation", {}).get("series") != plan[pin]["series"]:
            print(f"{pin}: series changed since the run: not recorded", file=sys.stderr)
            continue
        ncu_ms, ghz, ncu_tf = got["ncu"]["4x4096"]
        rows = {f"{shape} {side}": f"{g:.1f}" for (_, _, shape, side), (g, _) in sorted(got["rows"].items())}
        heads = {k[:3]: got["heads"][k][0] / got["heads"][(*k[:3], "before")][0]
                 for k in got["heads"] if k[3] == "after"}  # TFLOP/s after / before = t(before) / t(after)
        worst = min(heads.items(), key=lambda kv: kv[1]) if heads else None
        entry["validation"]["kernel"] = {
            "by": "scripts/gpu_hd512.py (vLLM's flash_attn_varlen_func, fa_version=4; 32 q / 4 kv heads, bf16, "
                  "causal, head 512, block 64)",
            "date": "-".join(data.name.split("-")[-3:]),  # the data directory is named ...-YYYY-MM-DD
            "device": "NVIDIA H100 80GB HBM3", "runtime": plan[pin]["runtime_pkgs"], "release": plan[pin]["release"],
            "graph_tflops": rows, "graph_timing": "A/B in one process, nothing else running; CUDA-graph replay "
                                                  f"of 5 calls, best of 3 rounds; SM clock {got.get('clock', '-')}",
            "ncu_4x4096": f"{ncu_ms:.3f} ms at {ghz:.2f} GHz -> {ncu_tf:.1f} TFLOP/s (one launch, ncu --clock-control none)",
            "goal": f"{'ok' if ncu_tf >= 480 else 'MISSED'}: head 512 block 64 prefill 4x4096 >= 480 TFLOP/s "
                    f"(ncu {ncu_tf:.1f}; graph A/B {got['rows'][(512, 64, '4x4096', 'after')][0]:.1f})",
        }
        if worst:
            entry["validation"]["kernel"]["heads_256_128_block64"] = {
                f"hd{h} {shape}": f"{got['heads'][(h, b, shape, 'before')][0]:.1f} -> "
                                  f"{got['heads'][(h, b, shape, 'after')][0]:.1f} TFLOP/s"
                for (h, b, shape) in sorted(heads)}
            entry["validation"]["kernel"]["goal_heads_256_128"] = (
                f"{'ok' if 1 / worst[1] <= 1.02 else 'MISSED'}: heads 256/128 block 64 prefill after/before time "
                f"<= 1.02 (worst {1 / worst[1]:.3f} at hd{worst[0][0]} {worst[0][2]}; the sides are timed in a "
                "fixed order, after first, and identical cubins read up to 6.7% in favour of the first)")
        print(f"{pin}: {entry['validation']['kernel']['goal']}", file=sys.stderr)
    write_manifest(manifest, root)


def main() -> int:
    if sys.argv[1:3] and sys.argv[1] == "record":
        record(Path(sys.argv[2]))
        return 0
    if sys.argv[1:2] == ["--child"]:
        sides, shapes, calls = sys.argv[2].split(","), sys.argv[3].split(","), int(sys.argv[4])
        print(json.dumps(child(sides, shapes, calls, sys.argv[5] == "1", sys.argv[6] == "1")))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["time", "ncu"])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--pin", required=True, help="pin7[,pin7...] or all (the bundle's plan)")
    ap.add_argument("--variant", action="append", default=[], help="NAME=DIR (files laid over the after tree's cute/)")
    ap.add_argument("--shapes", default="4x4096,2x8192,1x16384,16x1024,nc4x4096")
    ap.add_argument("--side", default="after", help="ncu: after, before or v<i>")
    ap.add_argument("--graph-only", action="store_true", help="time: no eager timing between the graph replays")
    args = ap.parse_args()
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    pins = sorted(json.loads((args.bundle / "plan.json").read_text())) if args.pin == "all" else args.pin.split(",")
    return max(run_pin(args, pin, out) for pin in pins)


if __name__ == "__main__":
    sys.exit(main())
