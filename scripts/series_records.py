#!/usr/bin/env python3
"""The project's own GPU validation records of each flash-attention series, in
patches/flash-attention/manifest.json (what `build` trusts on every machine; users' records go to their
data directory, see `vllm-forge validate`).

  python scripts/series_records.py validation RESULT.json...   each `vllm-forge validate` result of a series
                                                               into its manifest entry's `validation`
  python scripts/series_records.py kernel DATA_DIR             `validation.kernel` from the 2026-11-23 head-512
                                                               kernel logs (docs/data/hd512-*)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from vllm_forge.series import read_manifest, series_for, write_manifest  # noqa: E402
from vllm_forge.validation import check_record  # noqa: E402

NOT_FA4_RUNTIME = ("python", "torch", "torch_cuda", "triton", "vllm")  # the rest: what fa4_compile_check installs


def validation(results: list[Path], root: Path | None = None) -> int:
    manifest = read_manifest(root)
    for path in results:
        r = check_record(json.loads(path.read_text()))
        series = series_for(r["pin_tree_sha256"], root)
        if series is None or series.hash != r["series"] or r.get("only", "all") != "all":
            print(f"{path}: series {r['series']} is not the manifest's current one, or a partial run: not recorded",
                  file=sys.stderr)
            continue
        entry = manifest["series"][r["pin_tree_sha256"]]
        earlier = entry.get("validation")
        d = r["device"]
        entry["validation"] = {**({"earlier": earlier} if earlier else {}),
            "by": f"vllm-forge validate ({r['tool']})", "date": r["date"][:10], "device": d["name"],
            "device_class": d["class"], "driver": d["driver"], "release": r["vllm"],
            "runtime": [f"{k}=={v}" for k, v in sorted(r["runtime"].items()) if k not in NOT_FA4_RUNTIME],
            "series": r["series"], "passed": r["passed"], "summary": r["summary"],
            "checks": f"{sum(c['ok'] for c in r['checks'])}/{len(r['checks'])} passed",
            "timing": f"A/B in one process, {r['rounds']} rounds alternating order; SM clock {r['clock']['note']}",
            "table": {f"hd{x['head']} block{x['page']} {x['case']}": f"{x['ratio']:.3f} forged/stock time"
                      for x in r["ab"] if "ratio" in x}}
        print(f"{path}: recorded ({'passed' if r['passed'] else 'failed'})", file=sys.stderr)
    write_manifest(manifest, root)
    return 0


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



if __name__ == "__main__":
    if sys.argv[1:2] == ["kernel"] and len(sys.argv) == 3:
        record(Path(sys.argv[2]))
        sys.exit(0)
    if sys.argv[1:2] == ["validation"] and len(sys.argv) > 2:
        sys.exit(validation([Path(a) for a in sys.argv[2:]]))
    sys.exit(__doc__)
