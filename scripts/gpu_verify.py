#!/usr/bin/env python3
"""GPU proof of a forged wheel, on an SM90 GPU. Run with the forged vllm/ package on PYTHONPATH.

  python scripts/gpu_verify.py [--stock-path DIR] [--v0220-test FILE] [--system]

a. kernel: flash_attn_varlen_func(fa_version=4, block_table=...) vs fp64, head 512/256, blocks 16/32/64,
   GQA 32:4 and 8:1, mixed prefill+decode batches (lengths 1 and non-multiples of the block), fresh
   random inputs, output poisoned with NaN first; passes when rel L2 <= 1e-2 and no NaN.
b. backend: vLLM's FlashAttentionImpl (head 512, 32/4 heads, bf16) selects FA 4 on SM90 and its
   forward on a paged KV cache matches the reference; with --stock-path, the same in a stock 0.19.1
   tree shows the refusal it replaces.
c. vLLM 0.22.0's own test_varlen_with_paged_kv (tests/kernels/attention/test_flash_attn.py) called
   with fa_version=4 on head sizes 128/256/512 (the file itself only parametrizes FA2/FA3).
d. --system: (a) again with FA4 taken from a separately installed flash-attn-4 (system FA4).
Results: $OUT/gpu_verify.json; exit status 1 if any check failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import subprocess
import sys
import time
import traceback
import types
from typing import Any

import pytest
import torch
from gpu_common import make_paged, reference, rel_l2, stub_compiled_fa, write_json

MIXED = [(1, 1), (1, 77), (37, 300), (1, 1000), (129, 129), (5, 18), (1, 4099)]
results: dict[str, Any] = {"device": torch.cuda.get_device_name(), "capability": torch.cuda.get_device_capability(),
                           "torch": torch.__version__}
failures: list[str] = []


def check(name: str, ok: bool, **info: Any) -> None:
    results.setdefault("checks", []).append({"name": name, "ok": ok, **info})
    print(f"{'PASS' if ok else 'FAIL'} {name} {info}", flush=True)
    if not ok:
        failures.append(name)


def kernel_matrix(label: str, varlen: Any) -> None:
    for hd, block, heads in itertools.product((512, 256), (16, 32, 64), ((32, 4), (8, 1))):
        p = make_paged(MIXED, heads, hd, block)
        out = torch.full_like(p.q, float("nan"))
        t0 = time.perf_counter()
        varlen(p.q, p.k_cache, p.v_cache, max_seqlen_q=p.max_q, cu_seqlens_q=p.cu_q, max_seqlen_k=p.max_kv,
               seqused_k=p.seqused_k, block_table=p.block_table, causal=True, softmax_scale=hd ** -0.5,
               fa_version=4, out=out)
        torch.cuda.synchronize()
        err = rel_l2(out, reference(p, hd ** -0.5))
        check(f"{label} hd{hd} block{block} gqa{heads[0]}:{heads[1]}",
              bool(err <= 1e-2 and not out.isnan().any()), rel_l2=f"{err:.2e}",
              nan=bool(out.isnan().any()), first_call_s=round(time.perf_counter() - t0, 1))


def backend_level() -> None:
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends import flash_attn as fa

    hd, heads, block = 512, (32, 4), 16
    check("backend supports_head_size(512) on SM90", fa.FlashAttentionBackend.supports_head_size(512),
          capability=str(current_platform.get_device_capability()))
    impl = fa.FlashAttentionImpl(num_heads=heads[0], head_size=hd, scale=hd ** -0.5, num_kv_heads=heads[1],
                                 alibi_slopes=None, sliding_window=None, kv_cache_dtype="auto")
    check("FlashAttentionImpl head 512 selects FA4", impl.vllm_flash_attn_version == 4,
          version=impl.vllm_flash_attn_version)
    p = make_paged(MIXED, heads, hd, block)
    kv_cache = torch.stack([p.k_cache, p.v_cache])  # [2, num_blocks, block, kv_heads, head]
    n = p.q.shape[0]
    meta = fa.FlashAttentionMetadata(
        num_actual_tokens=n, max_query_len=p.max_q, query_start_loc=p.cu_q, max_seq_len=p.max_kv,
        seq_lens=p.seqused_k, block_table=p.block_table, slot_mapping=torch.zeros(n, dtype=torch.int64, device="cuda"),
        use_cascade=False, common_prefix_len=0, cu_prefix_query_lens=None, prefix_kv_lens=None,
        suffix_kv_lens=None)
    one = torch.ones(1, device="cuda")
    layer = types.SimpleNamespace(_q_scale=one, _k_scale=one, _v_scale=one)
    out = torch.full_like(p.q, float("nan"))
    impl.forward(layer, p.q, None, None, kv_cache, meta, output=out)
    torch.cuda.synchronize()
    err = rel_l2(out, reference(p, hd ** -0.5))
    check("FlashAttentionImpl.forward head 512 paged vs fp64", bool(err <= 1e-2 and not out.isnan().any()),
          rel_l2=f"{err:.2e}")


STOCK_PROBE = """
import sys, types, torch
for name in ("vllm._C", "vllm._C_stable_libtorch", "vllm.vllm_flash_attn._vllm_fa2_C",
             "vllm.vllm_flash_attn._vllm_fa3_C"):
    sys.modules[name] = types.ModuleType(name)
from vllm.v1.attention.backends import flash_attn as fa, fa_utils
from vllm.vllm_flash_attn.flash_attn_interface import flash_attn_varlen_func
print("stock supports_head_size(512):", fa.FlashAttentionBackend.supports_head_size(512))
print("stock get_flash_attn_version(head_size=512):", fa_utils.get_flash_attn_version(head_size=512))
q = torch.randn(4, 32, 512, device="cuda", dtype=torch.bfloat16)
kv = torch.randn(4, 16, 4, 512, device="cuda", dtype=torch.bfloat16)
try:
    flash_attn_varlen_func(q, kv, kv, max_seqlen_q=4,
        cu_seqlens_q=torch.tensor([0, 4], dtype=torch.int32, device="cuda"),
        max_seqlen_k=20, seqused_k=torch.tensor([20], dtype=torch.int32, device="cuda"),
        block_table=torch.tensor([[0, 1]], dtype=torch.int32, device="cuda"), causal=True, fa_version=4)
    print("stock FA4 paged call: no error")
except Exception as e:
    print("stock FA4 paged call:", type(e).__name__, str(e).splitlines()[0])
"""


def stock(path: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([path, *os.environ.get("PYTHONPATH", "").split(os.pathsep)[1:]])}
    r = subprocess.run([sys.executable, "-c", STOCK_PROBE], capture_output=True, text=True, env=env, timeout=300)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("stock")]
    results["stock"] = lines or r.stderr[-2000:]
    print("\n".join(lines) or r.stderr[-2000:])
    check("stock 0.19.1 refuses what the forged wheel serves",
          "stock supports_head_size(512): False" in lines
          and any("not supported on SM90" in ln or "NotImplementedError" in ln for ln in lines), lines=lines)


def upstream_test(path: str) -> None:
    spec = importlib.util.spec_from_file_location("test_flash_attn_v0220", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for hd, heads, window in itertools.product((128, 256, 512), ((4, 4), (8, 2)), (None, 256)):
        name = f"v0.22.0 test_varlen_with_paged_kv fa4 hd{hd} heads{heads} window{window}"
        try:
            mod.test_varlen_with_paged_kv(use_out=True, seq_lens=[(1, 1328), (5, 18), (129, 463)], num_heads=heads,
                                          head_size=hd, sliding_window=window, dtype=torch.bfloat16, block_size=16,
                                          soft_cap=None, num_blocks=2048, fa_version=4, q_dtype=None)
            check(name, True)
        except (Exception, pytest.skip.Exception) as e:  # assert_close failures, refusals, skips
            check(name, False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
        finally:
            torch.set_default_device(None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stock-path", help="PYTHONPATH entry of a stock vLLM 0.19.1 tree")
    ap.add_argument("--v0220-test", help="vLLM 0.22.0's tests/kernels/attention/test_flash_attn.py")
    ap.add_argument("--system", action="store_true", help="also run (a) with system FA4 (flash_attn.cute)")
    args = ap.parse_args()
    stub_compiled_fa()
    from vllm.vllm_flash_attn import flash_attn_interface as fi

    steps = [("kernel", lambda: kernel_matrix("bundled FA4", fi.flash_attn_varlen_func)),
             ("backend", backend_level)]
    if args.stock_path:
        steps.append(("stock", lambda: stock(args.stock_path)))
    if args.v0220_test:
        steps.append(("upstream-test", lambda: upstream_test(args.v0220_test)))
    if args.system:
        def system() -> None:
            from flash_attn.cute.interface import _flash_attn_fwd
            fi._FA4_FWD = _flash_attn_fwd  # what forge_system_fa4 resolves to when system FA4 is chosen
            kernel_matrix("system FA4", fi.flash_attn_varlen_func)
        steps.append(("system", system))
    for name, step in steps:
        try:
            step()
        except Exception:
            check(f"{name} ran", False, error=traceback.format_exc()[-3000:])
    results["failures"] = failures
    write_json("gpu_verify.json", results)
    print(f"{len(results['checks']) - len(failures)} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
