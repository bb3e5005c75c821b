#!/usr/bin/env python3
"""GPU proof of a `_vllm_fa3_C` built by this project's CMake (-DVLLM_FORGE_FA_CUDA=ON) against the one
vLLM ships, on an SM90 GPU.

  python scripts/gpu_fa3_ext.py --built PATH/_vllm_fa3_C.abi3.so[.xz] --vllm-root DIR --test FILE
                                [--out DIR] [--site PATH] [--head-sizes 40,72,80,128,256]
                                [--no-stock-tests] [--skip-pytest] [--skip-compare]

--vllm-root: a directory whose vllm/ is the installed stock vLLM (0.22.1: its
  vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so is built from the same flash-attention commit for the same
  torch); vLLM's Python dependencies on PYTHONPATH (or --site).
--test: vLLM's own tests/kernels/attention/test_flash_attn.py (from the release's sdist).

(a) vLLM's test file, FA3 cases only (fa_version=3, q_dtype None: the build has no FP8), head sizes
    --head-sizes (default: all of the file's, 40/72/80/128/256, which a 64/128/256 build serves: 40 by
    the hdim-64 kernels, 72 and 80 by hdim 128 when hdim 96 is switched off), against a copy of the
    stock vllm tree whose vllm_flash_attn/_vllm_fa3_C.abi3.so is the built one (the rest are links to
    the stock tree), and (baseline) the same selection against the stock tree itself. junit XML and
    -rA output under --out.
(b) the same inputs (bf16; varlen, paged KV with blocks 16 and 64; causal and not; MHA and GQA;
    a sliding window; head dims 64/128/256) through the built and the shipped `_vllm_fa3_C`, each in
    its own process (both register the torch op namespace _vllm_fa3_C), through vLLM's
    `flash_attn_varlen_func(fa_version=3, return_softmax_lse=True)`, compared bit for bit
    (torch.equal on out and LSE). Twice: num_splits=1 (the same kernel path on both: the trimmed
    build has FLASHATTENTION_DISABLE_SPLIT) and num_splits=0 (each side's own heuristic: the stock
    one may split decode rows, so a difference there is expected, not a failure). Each side also
    runs each case twice, to show it is deterministic run to run.

Writes --out/gpu_fa3_ext.json (default $OUT, else ./fa3-out) and prints a table. Exit status 0 when
the built extension passes every selected test and every num_splits=1 case is bit-identical, 1
otherwise, 2 on bad arguments (`vllm-forge: error: <what> -- <what to do>`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

SO = "_vllm_fa3_C.abi3.so"
TEST_HEADS = (40, 72, 80, 128, 256)
BUILT_DIMS = (64, 128, 256)
# (name, head dim, layout, (q heads, kv heads), causal, window)
SEQS = [(1, 1328), (5, 18), (129, 463), (300, 300), (1, 37), (64, 2011)]


class UsageError(Exception):
    def __init__(self, what: str, todo: str) -> None:
        super().__init__(f"{what} -- {todo}")


def fail(e: UsageError) -> None:
    print(f"vllm-forge: error: {e}", file=sys.stderr)
    sys.exit(2)


def sha256(p: Path) -> str:
    h = hashlib.sha256()
    with p.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cases() -> list[dict[str, Any]]:
    out = []
    for d in BUILT_DIMS:
        for layout in ("varlen", "paged16", "paged64"):
            for heads, causal in (((8, 8), True), ((16, 2), True), ((16, 2), False)):
                out.append({"d": d, "layout": layout, "heads": heads, "causal": causal, "window": None})
        out.append({"d": d, "layout": "paged16", "heads": (16, 2), "causal": True, "window": 256})
    for i, c in enumerate(out):
        c["name"] = (f"{i:02d} d{c['d']} {c['layout']} {c['heads'][0]}/{c['heads'][1]} "
                     f"{'causal' if c['causal'] else 'full'}" + (f" win{c['window']}" if c["window"] else ""))
    return out


def make_inputs(path: Path) -> list[dict[str, Any]]:
    """Inputs on the CPU, seeded, saved once: both sides load the very same tensors."""
    import torch

    g = torch.Generator().manual_seed(1234)
    data = []
    for c in cases():
        hq, hk = c["heads"]
        d = c["d"]
        qlens = [q for q, _ in SEQS]
        klens = [k for _, k in SEQS]
        t: dict[str, Any] = {"case": c}
        t["q"] = torch.randn(sum(qlens), hq, d, generator=g).to(torch.bfloat16)
        t["cu_q"] = torch.tensor([0, *qlens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        t["max_q"], t["max_k"] = max(qlens), max(klens)
        if c["layout"] == "varlen":
            t["k"] = torch.randn(sum(klens), hk, d, generator=g).to(torch.bfloat16)
            t["v"] = torch.randn(sum(klens), hk, d, generator=g).to(torch.bfloat16)
            t["cu_k"] = torch.tensor([0, *klens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        else:
            block = int(c["layout"].removeprefix("paged"))
            per_seq = [(k + block - 1) // block for k in klens]
            nblocks = sum(per_seq) + 7
            t["k"] = torch.randn(nblocks, block, hk, d, generator=g).to(torch.bfloat16)
            t["v"] = torch.randn(nblocks, block, hk, d, generator=g).to(torch.bfloat16)
            perm = torch.randperm(nblocks, generator=g).to(torch.int32)
            table = torch.zeros(len(klens), max(per_seq), dtype=torch.int32)
            at = 0
            for i, n in enumerate(per_seq):
                table[i, :n] = perm[at:at + n]
                at += n
            t["block_table"] = table
            t["seqused_k"] = torch.tensor(klens, dtype=torch.int32)
        data.append(t)
    torch.save(data, path)
    return data


def worker(cases_path: Path, result_path: Path) -> None:
    """Runs inside one process whose PYTHONPATH starts with one vllm tree."""
    import torch
    import vllm.vllm_flash_attn.flash_attn_interface as fi
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    if not fi.FA3_AVAILABLE:
        raise SystemExit(f"FA3 unavailable in this tree: {fi.FA3_UNAVAILABLE_REASON}")
    mod = sys.modules["vllm.vllm_flash_attn._vllm_fa3_C"]
    data = torch.load(cases_path)
    res: dict[str, Any] = {"so": os.path.realpath(mod.__file__), "device": torch.cuda.get_device_name(),
                           "torch": str(torch.__version__), "cuda": str(torch.version.cuda), "rows": []}
    for t in data:
        c = t["case"]
        q = t["q"].cuda()
        k, v = t["k"].cuda(), t["v"].cuda()
        kw: dict[str, Any] = {"q": q, "k": k, "v": v, "max_seqlen_q": t["max_q"], "cu_seqlens_q": t["cu_q"].cuda(),
                              "max_seqlen_k": t["max_k"], "softmax_scale": c["d"] ** -0.5, "causal": c["causal"],
                              "window_size": [c["window"] - 1, 0] if c["window"] else [-1, -1],
                              "return_softmax_lse": True, "fa_version": 3}
        if c["layout"] == "varlen":
            kw["cu_seqlens_k"] = t["cu_k"].cuda()
        else:
            kw["block_table"] = t["block_table"].cuda()
            kw["seqused_k"] = t["seqused_k"].cuda()
        row: dict[str, Any] = {"name": c["name"]}
        for splits in (1, 0):
            try:
                outs = []
                for _ in range(2):
                    o, lse = flash_attn_varlen_func(num_splits=splits, **kw)
                    torch.cuda.synchronize()
                    outs.append((o.cpu(), lse.cpu()))
                row[f"s{splits}"] = {"out": outs[0][0], "lse": outs[0][1],
                                     "repeat_equal": bool(torch.equal(outs[0][0], outs[1][0])
                                                          and torch.equal(outs[0][1], outs[1][1]))}
            except Exception as e:  # noqa: BLE001 - recorded per case, reported by the parent
                row[f"s{splits}"] = {"error": f"{type(e).__name__}: {e}"}
        res["rows"].append(row)
    torch.save(res, result_path)


def link_tree(stock_root: Path, built_so: Path, dest: Path) -> Path:
    """dest/: every entry of the stock root linked, except vllm/vllm_flash_attn/, which is a real
    directory (its Python files copied, _vllm_fa2_C linked) holding the built _vllm_fa3_C."""
    dest.mkdir(parents=True)
    for entry in stock_root.iterdir():
        if entry.name != "vllm":
            (dest / entry.name).symlink_to(entry.resolve())
    stock_vllm = stock_root / "vllm"
    (dest / "vllm").mkdir()
    for entry in stock_vllm.iterdir():
        if entry.name != "vllm_flash_attn":
            (dest / "vllm" / entry.name).symlink_to(entry.resolve())
    fa_src = stock_vllm / "vllm_flash_attn"
    fa_dst = dest / "vllm" / "vllm_flash_attn"
    shutil.copytree(fa_src, fa_dst, symlinks=False, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    for so in fa_src.glob("*.so"):
        if so.name != SO:
            (fa_dst / so.name).symlink_to(so.resolve())
    shutil.copy2(built_so, fa_dst / SO)
    return dest


PLUGIN = '''
import os
HEADS = {int(h) for h in os.environ["FA3_EXT_HEADS"].split(",")}

def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        p = getattr(getattr(item, "callspec", None), "params", {})
        ok = p.get("fa_version") == 3 and p.get("q_dtype") is None and p.get("head_size") in HEADS
        (keep if ok else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep
'''


def junit_counts(xml: Path) -> dict[str, int]:
    if not xml.exists():
        return {"tests": 0, "failures": 0, "errors": 1, "skipped": 0, "passed": 0}
    root = ET.parse(xml).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    assert suite is not None
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    n["passed"] = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    return n


def run_pytest(label: str, tree: Path, test: Path, work: Path, out: Path, site: list[str], heads: str,
               collect_only: bool = False) -> dict[str, Any]:
    tdir = work / f"pytest-{label}"
    (tdir / "tests" / "kernels" / "attention").mkdir(parents=True)
    tfile = tdir / "tests" / "kernels" / "attention" / "test_flash_attn.py"
    shutil.copy2(test, tfile)
    (tdir / "pytest.ini").write_text("[pytest]\n")
    (tdir / "fa3_select.py").write_text(PLUGIN)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tdir), str(tree), *site]), "FA3_EXT_HEADS": heads,
           "PYTHONDONTWRITEBYTECODE": "1"}
    xml = out / f"pytest_{label}.xml"
    cmd = [sys.executable, "-m", "pytest", "-p", "fa3_select", "-p", "no:cacheprovider", "-c", str(tdir / "pytest.ini"),
           "--rootdir", str(tdir), "-rA", "-q", f"--junitxml={xml}", str(tfile)]
    if collect_only:
        cmd.append("--collect-only")
    t0 = time.time()
    r = subprocess.run(cmd, cwd=tdir, env=env, capture_output=True, text=True, check=False)
    (out / f"pytest_{label}.log").write_text(r.stdout + r.stderr)
    counts = junit_counts(xml) if not collect_only else {"collected": sum(
        "::test_" in line for line in r.stdout.splitlines())}
    counts["rc"] = r.returncode
    counts["seconds"] = round(time.time() - t0, 1)
    tail = (r.stdout + r.stderr).strip().splitlines()[-1:] or [""]
    print(f"pytest [{label}]: {counts}  ({tail[0]})")
    return counts


def probe(tree: Path, site: list[str]) -> dict[str, Any]:
    code = ("import hashlib,json,os,sys,torch; import vllm.vllm_flash_attn.flash_attn_interface as fi; "
            "m=sys.modules.get('vllm.vllm_flash_attn._vllm_fa3_C'); "
            "print(json.dumps({'fa3': fi.FA3_AVAILABLE, 'reason': fi.FA3_UNAVAILABLE_REASON, "
            "'so': os.path.realpath(m.__file__) if m else None, "
            "'so_sha256': hashlib.sha256(open(m.__file__,'rb').read()).hexdigest() if m else None, "
            "'torch': torch.__version__, "
            "'device': torch.cuda.get_device_name() if torch.cuda.is_available() else None}))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), *site])}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        return {"fa3": False, "reason": r.stderr.strip().splitlines()[-1:] or ["import failed"]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def compare(work: Path, trees: dict[str, Path], site: list[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    import torch

    cases_path = work / "cases.pt"
    make_inputs(cases_path)
    results = {}
    for side, tree in trees.items():
        rp = work / f"result_{side}.pt"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), *site])}
        r = subprocess.run([sys.executable, __file__, "--worker", str(cases_path), str(rp)], env=env,
                           capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"{side} worker failed: {(r.stdout + r.stderr)[-3000:]}")
        results[side] = torch.load(rp)
        print(f"{side}: {results[side]['so']} on {results[side]['device']}")
    rows = []
    for b, s in zip(results["built"]["rows"], results["stock"]["rows"], strict=True):
        row: dict[str, Any] = {"case": b["name"]}
        for key in ("s1", "s0"):
            if "error" in b[key] or "error" in s[key]:
                row[key] = {"equal": False, "built_error": b[key].get("error"), "stock_error": s[key].get("error")}
                continue
            eq_out = torch.equal(b[key]["out"], s[key]["out"])
            eq_lse = torch.equal(b[key]["lse"], s[key]["lse"])
            diff = (b[key]["out"].float() - s[key]["out"].float()).abs().max().item()
            row[key] = {"equal": bool(eq_out and eq_lse), "out_equal": bool(eq_out), "lse_equal": bool(eq_lse),
                        "max_abs_diff": diff, "built_repeat_equal": b[key]["repeat_equal"],
                        "stock_repeat_equal": s[key]["repeat_equal"]}
        rows.append(row)
    return rows, {k: {kk: v[kk] for kk in ("so", "device", "torch", "cuda")} for k, v in results.items()}


def print_table(rows: list[dict[str, Any]]) -> None:
    def cell(r: dict[str, Any]) -> str:
        if "max_abs_diff" not in r:
            return "ERROR"
        mark = "equal" if r["equal"] else f"DIFF {r['max_abs_diff']:.3g}"
        rep = "" if r["built_repeat_equal"] and r["stock_repeat_equal"] else " (nondet)"
        return mark + rep
    print(f"| {'case':<36} | {'num_splits=1':<22} | {'num_splits=0 (heuristic)':<24} |")
    print(f"|{'-' * 38}|{'-' * 24}|{'-' * 26}|")
    for r in rows:
        print(f"| {r['case']:<36} | {cell(r['s1']):<22} | {cell(r['s0']):<24} |")


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--built", type=Path, required=True, help="the built _vllm_fa3_C.abi3.so (or .so.xz)")
    ap.add_argument("--vllm-root", type=Path, required=True, help="directory whose vllm/ is the stock vLLM package")
    ap.add_argument("--test", type=Path, required=True, help="vLLM's tests/kernels/attention/test_flash_attn.py")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "fa3-out")))
    ap.add_argument("--site", action="append", default=None,
                    help="vLLM's dependencies (default: PYTHONPATH without --vllm-root)")
    ap.add_argument("--head-sizes", default=",".join(map(str, TEST_HEADS)))
    ap.add_argument("--no-stock-tests", action="store_true", help="do not run the test selection on the stock tree")
    ap.add_argument("--skip-pytest", action="store_true")
    ap.add_argument("--skip-compare", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the temporary trees")
    ap.add_argument("--collect-only", action="store_true",
                    help="no GPU needed: build the trees and only collect the test selection (pytest --collect-only)")
    try:
        a = ap.parse_args(argv)
    except SystemExit as e:
        if e.code not in (0, None):
            fail(UsageError("bad arguments", "see gpu_fa3_ext.py --help"))
        raise
    if not a.built.is_file():
        fail(UsageError(f"--built {a.built} is not a file", "pass the built _vllm_fa3_C.abi3.so (or .so.xz)"))
    if not (a.vllm_root / "vllm" / "vllm_flash_attn" / SO).is_file():
        fail(UsageError(f"--vllm-root {a.vllm_root} has no vllm/vllm_flash_attn/{SO}",
                        "pass the directory that holds the installed stock vllm/ package"))
    if not a.test.is_file():
        fail(UsageError(f"--test {a.test} is not a file",
                        "pass tests/kernels/attention/test_flash_attn.py of the vLLM sdist"))
    try:
        heads = [int(h) for h in a.head_sizes.split(",") if h]
    except ValueError:
        fail(UsageError(f"--head-sizes {a.head_sizes!r} is not a comma-separated list of integers", "e.g. 40,128,256"))
    bad = [h for h in heads if h not in TEST_HEADS]
    if not heads or bad:
        fail(UsageError(f"--head-sizes {a.head_sizes}: the test file has head sizes {TEST_HEADS} only",
                        "choose among them"))
    return a


def main(argv: list[str]) -> int:
    if argv[:1] == ["--worker"]:
        worker(Path(argv[1]), Path(argv[2]))
        return 0
    a = parse(argv)
    root = a.vllm_root.resolve()
    # each side's tree goes first on its PYTHONPATH, so `vllm` resolves there even when a deps
    # directory also holds a vllm package
    site = a.site if a.site is not None else [
        p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != root]
    a.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fa3ext-"))
    try:
        built = work / SO
        if a.built.name.endswith(".xz"):
            with lzma.open(a.built) as src, built.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        else:
            shutil.copy2(a.built, built)
        trees = {"built": link_tree(root, built, work / "tree-built"), "stock": root}
        report: dict[str, Any] = {
            "built_so": {"path": str(a.built), "sha256": sha256(built), "bytes": built.stat().st_size},
            "stock_so": {"sha256": sha256(root / "vllm" / "vllm_flash_attn" / SO),
                         "bytes": (root / "vllm" / "vllm_flash_attn" / SO).stat().st_size},
            "probe": {k: probe(t, site) for k, t in trees.items()}, "head_sizes": a.head_sizes}
        print(json.dumps(report, indent=1))
        if a.collect_only:
            report["collect"] = {k: run_pytest(k, t, a.test, work, a.out, site, a.head_sizes, collect_only=True)
                                 for k, t in trees.items()}
            (a.out / "gpu_fa3_ext.json").write_text(json.dumps(report, indent=1))
            return 0 if all(c["rc"] == 0 and c["collected"] > 0 for c in report["collect"].values()) else 1
        for side, want in (("built", report["built_so"]["sha256"]), ("stock", report["stock_so"]["sha256"])):
            got = report["probe"][side].get("so_sha256")
            if got is not None and got != want:
                print(f"{side}: the tree loaded {report['probe'][side]['so']}, not the expected extension",
                      file=sys.stderr)
                return 1
        if not report["probe"]["built"].get("fa3"):
            print("the built extension does not load: see probe.built.reason", file=sys.stderr)
            (a.out / "gpu_fa3_ext.json").write_text(json.dumps(report, indent=1))
            return 1
        ok = True
        if not a.skip_pytest:
            report["pytest"] = {"built": run_pytest("built", trees["built"], a.test, work, a.out, site, a.head_sizes)}
            if not a.no_stock_tests:
                report["pytest"]["stock"] = run_pytest("stock", root, a.test, work, a.out, site, a.head_sizes)
            pb = report["pytest"]["built"]
            ok &= pb["failures"] == 0 and pb["errors"] == 0 and pb["passed"] > 0
        if not a.skip_compare:
            rows, sides = compare(work, trees, site)
            report["compare"] = {"sides": sides, "rows": rows,
                                 "equal_splits1": sum(r["s1"]["equal"] for r in rows),
                                 "equal_splits0": sum(r["s0"]["equal"] for r in rows), "cases": len(rows)}
            print_table(rows)
            print(f"bit-identical: num_splits=1 {report['compare']['equal_splits1']}/{len(rows)}, "
                  f"num_splits=0 {report['compare']['equal_splits0']}/{len(rows)}")
            ok &= report["compare"]["equal_splits1"] == len(rows)
        report["ok"] = bool(ok)
        (a.out / "gpu_fa3_ext.json").write_text(json.dumps(report, indent=1))
        print(f"wrote {a.out / 'gpu_fa3_ext.json'}: ok={ok}")
        return 0 if ok else 1
    finally:
        if a.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
