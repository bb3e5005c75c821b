"""`vllm-forge validate`: a forged wheel's FA4 on this GPU -- kernel checks against float64, an A/B against
the release's stock FA4 in one process, and a validation record that `build`'s gate accepts.

Both sides are called through vLLM's own `flash_attn_varlen_func(fa_version=4)`, as vLLM's backend
calls it (paged KV, `seqused_k`, `block_table`, `out=`):
- forged: the installed vLLM (a vllm-forge wheel), or `--wheel`'s `vllm/vllm_flash_attn/` loaded as a
  package of its own;
- stock: the same release's wheel (download cache, `--stock-wheel`, or the index), its tree hash checked.

Checks (forged side; rel L2 <= 1e-2 against float64, output poisoned with NaN first): heads 512/256
x pages 16/32/64 x GQA 8:1 and 16:1 on a mixed prefill + decode batch, causal; non-causal; q as a
strided view into a fused qkv buffer; a decode batch captured in a CUDA graph and replayed on new
contents and lengths; a 256-key sliding window at head 256; fp8 (e4m3) KV with bf16 queries at head 512
on 64-token pages where the tree's FA4 has that path (`fp8_kv_dequant`, flash-attention 06bdd47 on; else
recorded as skipped, with why).

A/B (forged vs stock, same inputs): prefill 4x4096 and 1x16384, decode 64x8192 and 16x32768, heads
512/256, pages 16/64 (`--pages`: any of 16/32/64/128), 32 q / 4 kv heads, bf16; where the tree has the
fp8-KV path, also head 512 with e4m3 K/V at 64-token pages (the FP8-KV kernel's page; reported, not
gated). Each round times both sides, the order alternating (forged first, then stock first, ...), as
CUDA-graph replays and eagerly; the SM clock is sampled (pynvml, else nvidia-smi) through every case.
Ratios are given per order, so an order bias shows.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import ForgeError
from ..output import make_output_dir
from ..pins import load_pins
from ..validation import FORMAT, device_class, slug, write_record
from .trees import (
    FORGED_PKG,
    STOCK_PKG,
    installed_stamp,
    runtime_path,
    stock_files,
    stub_extensions,
    wheel_stamp,
    write_renamed,
)

HQ = 32
MIXED = [(1, 1), (1, 77), (37, 300), (1, 1000), (129, 129), (5, 18), (1, 4099)]
GRAPH_SEQS = [(1, n) for n in (4099, 17, 1000, 64, 2048, 333, 1, 777)]
AB_CASES = {"prefill 4x4096": [(4096, 4096)] * 4, "prefill 1x16384": [(16384, 16384)],
            "decode 64x8192": [(1, 8192)] * 64, "decode 16x32768": [(1, 32768)] * 16}
RUNTIME_DISTS = ("vllm", "torch", "triton", "nvidia-cutlass-dsl", "nvidia-cutlass-dsl-libs-base", "quack-kernels",
                 "apache-tvm-ffi", "torch-c-dlpack-ext", "einops")
TOLERANCE = 1e-2
PAGE_SIZES = (16, 32, 64, 128)
FP8_CASES = ("prefill 4x4096", "prefill 1x16384", "decode 64x8192")  # head 512, 64-token pages


@dataclass(frozen=True)
class ValidateRequest:
    vllm: str | None = None            # the expected release of the forged vLLM
    wheel: Path | None = None          # the forged wheel (else: the installed vLLM)
    stock_wheel: Path | None = None    # the release's wheel (else: download cache, else the index)
    paths: tuple[Path, ...] = ()       # pip --target directories to import from (runtime, dependencies)
    out: Path = Path(".")
    index_url: str | None = None
    rounds: int = 4
    only: str = "all"                  # all | checks | ab
    record: bool = True
    pages: tuple[int, ...] = (16, 64)  # A/B page sizes


def check_request(req: ValidateRequest) -> None:
    """Everything that needs no GPU, before anything is imported."""
    if req.only not in ("all", "checks", "ab"):
        raise ForgeError(f"--only {req.only!r}", "use all, checks or ab")
    if req.rounds < 2 or req.rounds % 2:
        raise ForgeError(f"--rounds {req.rounds}: the sides alternate", "give an even number >= 2")
    if not req.pages or any(p not in PAGE_SIZES for p in req.pages) or len(set(req.pages)) != len(req.pages):
        raise ForgeError(f"--pages {','.join(map(str, req.pages))}",
                         f"give distinct page sizes from {', '.join(map(str, PAGE_SIZES))}, comma-separated")
    if req.wheel is not None and not req.wheel.is_file():
        raise ForgeError(f"forged wheel {req.wheel} does not exist", "give the wheel `vllm-forge build` made")
    for p in req.paths:
        if not p.is_dir():
            raise ForgeError(f"--path {p} is not a directory", "give a pip --target directory")
    if req.vllm is not None:
        load_pins().for_version(req.vllm, servable=False)


def require_gpu() -> Any:
    """torch with a CUDA device, or one ForgeError line saying what is missing."""
    try:
        import torch
    except ImportError as e:
        raise ForgeError(f"no torch here ({e})", "run it where the forged vLLM and its CUDA torch are "
                         "installed") from None
    if not torch.cuda.is_available():
        raise ForgeError(f"no CUDA GPU visible to torch {torch.__version__} (CUDA build: {torch.version.cuda})",
                         "run it on the GPU machine where the forged vLLM is installed")
    return torch


# ------------------------------------------------------------------ device, runtime, clock
def _nvml() -> Any:
    try:
        import pynvml
        pynvml.nvmlInit()
        return pynvml
    except Exception:  # noqa: BLE001 - not installed, no library, no driver: use the next source
        return None


def _nvml_index(torch: Any) -> int:
    cur = torch.cuda.current_device()
    visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return int(visible[cur]) if cur < len(visible) and visible[cur].strip().isdigit() else int(cur)


def driver_version(torch: Any) -> str:
    nv = _nvml()
    if nv is not None:
        with contextlib.suppress(Exception):
            v = nv.nvmlSystemGetDriverVersion()
            return v.decode() if isinstance(v, bytes) else str(v)
    if shutil.which("nvidia-smi"):
        r = subprocess.run(["nvidia-smi", "-i", str(_nvml_index(torch)), "--query-gpu=driver_version",
                            "--format=csv,noheader"], capture_output=True, text=True, check=False)
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.strip().splitlines()[0]
    try:
        n = ctypes.c_int()
        ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(n))
        return f"CUDA driver API {n.value // 1000}.{n.value % 1000 // 10}"
    except OSError:
        return "unknown"


def device_info(torch: Any) -> dict[str, Any]:
    i = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(i)
    cap = torch.cuda.get_device_capability(i)
    return {"name": props.name, "capability": f"{cap[0]}.{cap[1]}", "class": device_class(cap),
            "driver": driver_version(torch), "memory_gib": round(props.total_memory / 2**30, 1),
            "sms": props.multi_processor_count}


def runtime_versions(torch: Any) -> dict[str, str]:
    got = {"python": sys.version.split()[0], "torch_cuda": str(torch.version.cuda)}
    for name in RUNTIME_DISTS:
        with contextlib.suppress(metadata.PackageNotFoundError):
            got[name] = metadata.version(name)
    return got


@dataclass
class ClockSampler:
    """The SM clock every 100 ms, in a thread: pynvml, else `nvidia-smi -lms`, else not sampled (said so)."""
    index: int
    source: str = "none"
    samples: list[int] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _proc: subprocess.Popen[str] | None = None

    def start(self) -> ClockSampler:
        nv = _nvml()
        try:
            handle = nv.nvmlDeviceGetHandleByIndex(self.index) if nv is not None else None
        except Exception:  # noqa: BLE001 - an index NVML does not know: the next source
            handle = None
        if nv is not None and handle is not None:
            self.source = "pynvml"

            def poll() -> None:
                while not self._stop.wait(0.1):
                    self.samples.append(int(nv.nvmlDeviceGetClockInfo(handle, nv.NVML_CLOCK_SM)))
            threading.Thread(target=poll, daemon=True).start()
        elif shutil.which("nvidia-smi"):
            self.source = "nvidia-smi"
            self._proc = subprocess.Popen(["nvidia-smi", "-i", str(self.index), "--query-gpu=clocks.sm",
                                           "--format=csv,noheader,nounits", "-lms", "100"],
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

            def read() -> None:
                assert self._proc is not None and self._proc.stdout is not None
                for ln in self._proc.stdout:
                    if ln.strip().isdigit():
                        self.samples.append(int(ln.strip()))
            threading.Thread(target=read, daemon=True).start()
        return self

    def mark(self) -> int:
        return len(self.samples)

    def since(self, mark: int) -> dict[str, int] | None:
        s = sorted(self.samples[mark:])
        return {"min": s[0], "median": s[len(s) // 2], "max": s[-1], "n": len(s)} if s else None

    def stop(self) -> None:
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()

    def note(self) -> str:
        return {"pynvml": "sampled with pynvml every 100 ms", "nvidia-smi": "sampled with nvidia-smi -lms 100",
                "none": "not sampled: neither pynvml nor nvidia-smi is available"}[self.source]


# ------------------------------------------------------------------ the two sides
@dataclass
class Sides:
    forged: Callable[..., Any]
    stock: Callable[..., Any]
    forged_interface: Any
    stock_origin: str
    forged_origin: str
    no_fp8: str  # why the forged tree has no fp8-KV path ("" when it has one)


def load_sides(req: ValidateRequest, stamp: dict[str, Any], forged_files: dict[str, bytes] | None,
               tmp: Path) -> Sides:
    from .kernels import paged_varlen

    vpin = load_pins().for_version(stamp["vllm"]["version"], servable=False)
    files, origin = stock_files(vpin, req.stock_wheel, req.index_url)
    sys.path.insert(0, str(write_renamed(files, tmp / "stock", STOCK_PKG)))
    stub_extensions(STOCK_PKG)
    if forged_files is not None:
        sys.path.insert(0, str(write_renamed(forged_files, tmp / "forged", FORGED_PKG)))
        stub_extensions(FORGED_PKG)
        forged_name, forged_origin = f"{FORGED_PKG}.vllm_flash_attn", str(req.wheel)
    else:
        forged_name, forged_origin = "vllm.vllm_flash_attn", "installed"
    try:
        fi = importlib.import_module(f"{forged_name}.flash_attn_interface")
        si = importlib.import_module(f"{STOCK_PKG}.vllm_flash_attn.flash_attn_interface")
    except Exception as e:  # noqa: BLE001 - an import error of vLLM's: one line, with what it said
        raise ForgeError(f"cannot import vLLM's flash_attn_interface: {type(e).__name__}: {e}",
                         "install the forged wheel's dependencies and FA4 runtime, or add them with --path") from None
    if forged_files is None:
        forged_origin = f"installed {Path(str(fi.__file__)).parents[2]}"
    return Sides(partial(paged_varlen, fi.flash_attn_varlen_func), partial(paged_varlen, si.flash_attn_varlen_func),
                 fi, origin, forged_origin, fp8_supported(fi))


def fp8_kv_path(wrapper_src: str, cute_interface_src: str) -> str:
    """'' when a tree's FA4 serves bf16 queries on fp8 (e4m3) K/V -- its cute `_flash_attn_fwd` takes
    `fp8_kv_dequant` and vLLM's `flash_attn_varlen_func` passes it on -- else why not. (Trees before
    flash-attention 06bdd47 take KV descales only with q, K and V all fp8: "inputs must have the same dtype".)"""
    import ast

    fwd = next((n for n in ast.walk(ast.parse(cute_interface_src))
                if isinstance(n, ast.FunctionDef) and n.name == "_flash_attn_fwd"), None)
    takes = fwd is not None and any(a.arg == "fp8_kv_dequant" for a in fwd.args.args + fwd.args.kwonlyargs)
    if takes and "fp8_kv_dequant" in wrapper_src:
        return ""
    return "this tree's FA4 has no fp8-KV path (no fp8_kv_dequant: q, K and V must share a dtype)"


def fp8_supported(interface: Any) -> str:
    import inspect

    cute = Path(str(interface.__file__)).parent / "cute" / "interface.py"
    return fp8_kv_path(inspect.getsource(interface.flash_attn_varlen_func), cute.read_text())


# ------------------------------------------------------------------ checks
def run_checks(torch: Any, sides: Sides) -> list[dict[str, Any]]:
    from .kernels import make_paged, reference, rel_l2

    call = sides.forged
    results: list[dict[str, Any]] = []

    def check(name: str, fn: Callable[[], tuple[Any, Any]]) -> None:
        t0 = time.perf_counter()
        try:
            out, ref = fn()
            err, error = rel_l2(out, ref), ""
        except Exception as e:  # noqa: BLE001 - a refusal or a crash of the kernel is this check's result
            err, error = float("inf"), f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ok = err <= TOLERANCE
        results.append({"name": name, "ok": ok, "rel_l2": err, "s": round(time.perf_counter() - t0, 1),
                        **({"error": error} if error else {})})
        print(f"{'PASS' if ok else 'FAIL'} {name}: rel L2 {err:.2e}{'  ' + error if error else ''}",
              file=sys.stderr, flush=True)
        torch.cuda.empty_cache()

    def plain(hd: int, block: int, hkv: int, causal: bool, window: int | None = None,
              fp8: bool = False) -> tuple[Any, Any]:
        p = make_paged(MIXED, (HQ, hkv), hd, block, seed=hd + block + hkv, fp8=fp8)
        out = torch.full_like(p.q, float("nan"))
        call(p, out, hd, causal, window=window)
        torch.cuda.synchronize()
        return out, reference(p, hd ** -0.5, causal, window)

    def strided(hd: int, block: int) -> tuple[Any, Any]:
        p = make_paged(MIXED, (HQ, 4), hd, block, seed=7)
        qkv = torch.randn(p.q.shape[0], (HQ + 2 * 4) * hd, device="cuda", dtype=p.q.dtype)
        q_view = qkv[:, :HQ * hd].view(-1, HQ, hd)
        q_view.copy_(p.q)
        out = torch.full_like(p.q, float("nan"))
        call(p, out, hd, True, q=q_view)
        torch.cuda.synchronize()
        return out, reference(p, hd ** -0.5)

    def graph_replay(hd: int, block: int) -> tuple[Any, Any]:
        p = make_paged(GRAPH_SEQS, (HQ, 4), hd, block, seed=11)
        out = torch.empty_like(p.q)
        call(p, out, hd)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            call(p, out, hd)
        outs, refs = [], []
        for trial in range(3):  # new contents and shorter lengths each replay, same buffers
            g = torch.Generator(device="cuda")
            g.manual_seed(100 + trial)
            for t in (p.q, p.k_cache, p.v_cache):
                t.copy_(torch.randn(t.shape, generator=g, device="cuda", dtype=t.dtype))
            p.kv_lens = [max(1, n - 13 * (trial + 1)) for n in p.kv_lens]
            p.seqused_k.copy_(torch.tensor(p.kv_lens, dtype=torch.int32, device="cuda"))
            out.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            outs.append(out.clone())
            refs.append(reference(p, hd ** -0.5))
        return torch.cat(outs), torch.cat(refs)

    for hd in (512, 256):
        for block in (16, 32, 64):
            for hkv in (4, 2):
                check(f"hd{hd} page{block} gqa{HQ // hkv}:1 causal", partial(plain, hd, block, hkv, True))
        for block in (16, 64):
            check(f"hd{hd} page{block} gqa8:1 non-causal", partial(plain, hd, block, 4, False))
            check(f"hd{hd} page{block} strided q (fused qkv view)", partial(strided, hd, block))
            check(f"hd{hd} page{block} CUDA graph replayed on new contents and lengths",
                  partial(graph_replay, hd, block))
    for block in (16, 64):
        check(f"hd256 page{block} sliding window 256", partial(plain, 256, block, 4, True, 256))
    why = sides.no_fp8
    if why:
        results.append({"name": "hd512 page64 fp8 KV", "ok": True, "skipped": why})
        print(f"SKIP hd512 page64 fp8 KV: {why}", file=sys.stderr)
    else:
        check("hd512 page64 fp8 KV (e4m3, per sequence and kv head descales)",
              partial(plain, 512, 64, 4, True, None, True))
    return results


# ------------------------------------------------------------------ A/B
def ab_plan(pages: tuple[int, ...], fp8: bool) -> list[tuple[int, int, str, bool]]:
    """(head, page, case, fp8 KV) of each A/B row, in the order they run."""
    plan = [(hd, block, case, False) for hd in (512, 256) for block in pages for case in AB_CASES]
    return plan + ([(512, 64, case, True) for case in FP8_CASES] if fp8 else [])


def run_ab(torch: Any, sides: Sides, rounds: int, clock: ClockSampler,
           pages: tuple[int, ...] = (16, 64)) -> list[dict[str, Any]]:
    from .kernels import best_ms, causal_flops, graph_of, kv_bytes, make_paged

    calls = {"forged": sides.forged, "stock": sides.stock}
    rows: list[dict[str, Any]] = []
    for hd, block, case, fp8 in ab_plan(pages, not sides.no_fp8):
        seqs = AB_CASES[case]
        iters = 5 if "prefill" in case else 20
        p = make_paged(seqs, (HQ, 4), hd, block, seed=0, fp8=fp8)
        row: dict[str, Any] = {"head": hd, "page": block, "case": case, "flops": causal_flops(seqs, HQ, hd),
                               "kv_bytes": kv_bytes(seqs, 4, hd) // (2 if fp8 else 1), "refused": {},
                               "samples": {}, **({"kv": "fp8"} if fp8 else {})}
        fns, graphs = {}, {}
        for side, call in calls.items():
            out = torch.empty_like(p.q)
            fn = partial(call, p, out, hd)
            try:
                fn()  # the first call compiles (FA4's JIT)
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001 - e.g. stock FA4 refusing head 512
                row["refused"][side] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                continue
            fns[side] = fn
            try:
                graphs[side] = graph_of(fn, iters)
            except Exception:  # noqa: BLE001 - no graph capture: eager timing only
                torch.cuda.synchronize()
        mark = clock.mark()
        for r in range(rounds):
            order = list(fns) if r % 2 == 0 else list(fns)[::-1]
            for pos, side in enumerate(order):
                g = graphs.get(side)
                row["samples"].setdefault(side, []).append({
                    "round": r, "position": pos,
                    "graph_ms": best_ms(g.replay, 1, reps=3) / iters if g is not None else None,
                    "eager_ms": best_ms(fns[side], iters, reps=2)})
        row["sm_clock_mhz"] = clock.since(mark)
        summarize(row)
        rows.append(row)
        print(format_row(row), file=sys.stderr, flush=True)
        del p, fns, graphs
        torch.cuda.empty_cache()
    return rows


def summarize(row: dict[str, Any]) -> None:
    """Best graph and eager time per side; forged/stock time ratios overall and per order."""
    for side, samples in row["samples"].items():
        graph = [s["graph_ms"] for s in samples if s["graph_ms"] is not None]
        row[side] = {"graph_ms": min(graph) if graph else None, "eager_ms": min(s["eager_ms"] for s in samples)}
    if "forged" in row["samples"] and "stock" in row["samples"]:
        key = "graph_ms" if row["forged"]["graph_ms"] and row["stock"]["graph_ms"] else "eager_ms"
        row["ratio"] = row["forged"][key] / row["stock"][key]
        row["ratio_timing"] = key
        by_order = {}
        for first in ("forged", "stock"):
            def mean(side: str, first: str = first) -> float:
                return statistics.fmean(s[key] for s in row["samples"][side]
                                        if (s["position"] == 0) == (side == first))
            by_order[f"{first} first"] = mean("forged") / mean("stock")
        row["ratio_by_order"] = by_order


def rate(row: dict[str, Any], ms: float | None) -> str:
    if ms is None:
        return "-"
    if "decode" in row["case"]:
        return f"{row['kv_bytes'] / ms / 1e9:.2f} TB/s"
    return f"{row['flops'] / ms / 1e9:.0f} TFLOP/s"


def format_row(row: dict[str, Any]) -> str:
    def side(s: str) -> str:
        if s in row["refused"]:
            return "refused"
        return f"{rate(row, row[s]['graph_ms'])} / {rate(row, row[s]['eager_ms'])}"
    ratio = (f"{row['ratio']:.3f} ({', '.join(f'{k} {v:.3f}' for k, v in row['ratio_by_order'].items())})"
             if "ratio" in row else "-")
    c = row.get("sm_clock_mhz")
    clock = f"{c['min']}-{c['max']} MHz" if c else "-"
    case = f"{row['case']}{' fp8' if row.get('kv') == 'fp8' else ''}"
    return (f"{case:20} hd{row['head']:<3} page{row['page']:<3} | {side('forged'):>28} | {side('stock'):>28} | "
            f"{ratio} | {clock}")


def goals(checks: list[dict[str, Any]], ab: list[dict[str, Any]]) -> list[dict[str, Any]]:
    bad = [c["name"] for c in checks if not c["ok"]]
    out = [{"goal": "every kernel check within rel L2 1e-2 of float64", "required": True, "ok": not bad,
            "got": f"{len(checks) - len(bad)}/{len(checks)}" + (f"; failed: {', '.join(bad)}" if bad else "")}
           ] if checks else []
    if ab:
        bf16 = [r for r in ab if r.get("kv") != "fp8"]  # fp8-KV rows are reported, not gated
        fast = [r for r in bf16 if r["head"] == 512 and r["page"] == 64 and "prefill" in r["case"]]
        slow = [r["ratio"] for r in fast if "ratio" in r]
        out.append({"goal": "head 512 page 64 prefill: forged/stock time <= 0.95 (where stock runs it)",
                    "required": True, "ok": all(x <= 0.95 for x in slow) and bool(fast),
                    "got": ", ".join(f"{x:.3f}" for x in slow) or "stock refuses head 512"})
        dec = [(r["ratio"], f"hd{r['head']} page{r['page']} {r['case']}")
               for r in bf16 if "decode" in r["case"] and "ratio" in r]
        worst = max(dec, default=(0.0, "-"))
        out.append({"goal": "decode: forged/stock time <= 1.02", "required": True, "ok": worst[0] <= 1.02,
                    "got": f"worst {worst[0]:.3f} at {worst[1]}"})
    return out


# ------------------------------------------------------------------ the command
def validate(req: ValidateRequest) -> int:
    check_request(req)
    for p in reversed(req.paths):
        sys.path[:0] = runtime_path(p.resolve())
    importlib.invalidate_caches()
    torch = require_gpu()
    forged_files = None
    if req.wheel is not None:
        stamp, forged_files = wheel_stamp(req.wheel)
    else:
        stamp = installed_stamp()
    version = stamp["vllm"]["version"]
    if req.vllm is not None and req.vllm != version:
        raise ForgeError(f"the forged vLLM {'in ' + str(req.wheel) if req.wheel else 'installed here'} is {version}, "
                         f"not {req.vllm}", "give the --vllm of the wheel, or the wheel of that release")
    from ..series import series_hash

    fa = stamp["flash_attention"]
    series = series_hash([p["sha256"] for p in fa["patches"]]) if fa["patches"] else ""
    make_output_dir(req.out)
    dev = device_info(torch)
    clock = ClockSampler(_nvml_index(torch)).start()
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="vllm-forge-validate-") as tmp:
            sides = load_sides(req, stamp, forged_files, Path(tmp))
            print(f"vLLM {version}: forged FA4 ({sides.forged_origin}, series {series or 'none'}) vs stock "
                  f"({sides.stock_origin}) on {dev['name']} (sm{dev['capability'].replace('.', '')})", file=sys.stderr)
            checks = run_checks(torch, sides) if req.only in ("all", "checks") else []
            ab = run_ab(torch, sides, req.rounds, clock, req.pages) if req.only in ("all", "ab") else []
    finally:
        clock.stop()
    result = {
        "format": FORMAT, "tool": f"vllm-forge {__version__}", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "vllm": version, "plan": stamp.get("plan"), "pin_tree_sha256": fa["pin_tree_sha256"], "series": series,
        "fa4_tree_sha256": fa["tree_sha256"], "forged": sides.forged_origin, "stock": sides.stock_origin,
        "device": dev, "runtime": runtime_versions(torch), "clock": {"source": clock.source, "note": clock.note()},
        "only": req.only, "rounds": req.rounds, "checks": checks, "ab": ab,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    result["goals"] = goals(checks, ab)
    # a record the gate trusts has every check; an A/B-only run is written, never recorded as passed
    required = [g["ok"] for g in result["goals"] if g["required"]]
    result["passed"] = req.only == "all" and bool(checks) and bool(ab) and all(required)
    result["summary"] = "; ".join(f"{'ok' if g['ok'] else 'MISSED'} {g['goal']} ({g['got']})" for g in result["goals"])
    print(report(result))
    out = req.out / f"validate-{version}-{dev['class']}-{slug(dev['name'])}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"results: {out}")
    if req.record and req.only == "all":
        print(f"validation record: {write_record(result)} ({'passed' if result['passed'] else 'FAILED'})")
    if req.only != "all":  # a partial run: its own goals decide
        return 0 if all(g["ok"] for g in result["goals"]) else 1
    return 0 if result["passed"] else 1


def report(result: dict[str, Any]) -> str:
    """The table of a result (also of one read back from its JSON)."""
    d = result["device"]
    lines = [f"vLLM {result['vllm']}, series {result['series'] or 'none'} on {d['name']} (sm{d['class'][2:]}, driver "
             f"{d['driver']}); {', '.join(f'{k} {v}' for k, v in result['runtime'].items())}",
             f"SM clock: {result['clock']['note']}"]
    checks = result["checks"]
    if checks:
        lines.append(f"checks: {sum(c['ok'] for c in checks)}/{len(checks)} passed")
        for c in checks:
            err = f" {c['error']}" if c.get("error") else ""
            got = c["skipped"] if "skipped" in c else f"rel L2 {c['rel_l2']:.2e}{err}"
            lines.append(f"  {'SKIP' if 'skipped' in c else 'ok  ' if c['ok'] else 'FAIL'} {c['name']}: {got}")
    if result["ab"]:
        lines.append(f"A/B, {result['rounds']} rounds alternating order; graph / eager; forged/stock time "
                     "(by order); SM clock")
        lines.append(f"{'case':20} {'head':7} {'page':7} | {'forged':>28} | {'stock':>28} | ratio | clock")
        lines += [format_row(r) for r in result["ab"]]
    lines += [f"{'ok    ' if g['ok'] else 'MISSED'} {'(required) ' if g['required'] else ''}{g['goal']}: {g['got']}"
              for g in result["goals"]]
    partial_run = "" if result["only"] == "all" else f" (--only {result['only']}: not a full validation)"
    lines.append("PASSED" if result["passed"] else "NOT PASSED" + partial_run)
    return "\n".join(lines)
