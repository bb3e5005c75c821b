"""The runtime layer shipped in forged wheels (vllm_overlay/runtime/_forge_runtime.py): its pure
decisions, and its presence in a real forged wheel."""

from __future__ import annotations

import importlib.util
import re
import sys
import types
import zipfile
from pathlib import Path

import pytest

from vllm_forge.runtime import add_entry_point, has_entry_point

from conftest import real_wheel, run_on_release

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("_forge_runtime", REPO / "vllm_overlay" / "runtime" / "_forge_runtime.py")
rt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rt)  # type: ignore[union-attr]


def test_page64_block_size_takes_the_smallest_that_gives_64() -> None:
    assert rt.page64_block_size(lambda b: {"global": 2 * b}) == 32
    assert rt.page64_block_size(lambda b: {"global": b if b >= 64 else 32}) == 64
    assert rt.page64_block_size(lambda b: {"a": 2 * b, "b": b}) is None  # two page sizes: never both 64
    assert rt.page64_block_size(lambda b: None) is None                  # vLLM cannot lay it out


# Gemma-4-31B's layers through a release's own Attention.get_kv_cache_spec and page-size unification:
# 5 sliding (16 kv heads x 256, window 1024) per global (4 kv heads x 512), bf16, FLASH_ATTN.
PAGES_PROBE = r"""
import importlib.util
import re
import torch
from vllm.model_executor.layers.attention.attention import Attention
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend
spec = importlib.util.spec_from_file_location("_forge_runtime", sys.argv[2])
rt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rt)

def layer(kv_heads, head, window):
    self = types.SimpleNamespace(attn_type=AttentionType.DECODER, sliding_window=window, num_kv_heads=kv_heads,
                                 head_size=head, head_size_v=head, kv_cache_torch_dtype=torch.bfloat16,
                                 kv_cache_dtype="auto", attn_backend=FlashAttentionBackend)
    self.get_kv_cache_spec = types.MethodType(Attention.get_kv_cache_spec, self)
    return self

cfg = types.SimpleNamespace(cache_config=types.SimpleNamespace(block_size=16, skip_page_size_padded=None),
                            model_config=types.SimpleNamespace(use_mla=False))
layers = {f"sliding.{i}": layer(16, 256, 1024) for i in range(5)} | {"global": layer(4, 512, None)}
pages, how = rt._pages(cfg, layers, {"global"})
print(how)
print(pages(16)["global"], rt.page64_block_size(pages))
"""


@pytest.mark.network
@pytest.mark.parametrize("version, default_page, block", [("0.22.1", 32, 32), ("0.25.1", 32, 64), ("0.33.0", 32, 32)])
def test_page64_block_size_by_each_release_own_layout(version: str, default_page: int, block: int,
                                                       tmp_path: Path) -> None:
    """0.22.x: every layer on the block size, so 32 gives the global layers 64-token pages; 0.25.x:
    sliding-window layers take their own 16-token blocks, so only 64 does (32 left them on 32-token
    pages, the slow path, while the log said otherwise); 0.33.0: vLLM's unification moved to
    kv_cache_planning, found there, and every layer on the block size again."""
    out = run_on_release(real_wheel(version), tmp_path, PAGES_PROBE,
                         str(REPO / "vllm_overlay" / "runtime" / "_forge_runtime.py"))
    how, result = out[-2:]
    assert how == "vLLM's own KV cache specs, unified"
    assert result.split() == [str(default_page), str(block)]


def test_cache_key_changes_with_gpu_and_torch() -> None:
    base = rt.device_key("NVIDIA H100 80GB HBM3", (9, 0), "2.11.0+cu130", "13.0")
    assert base.startswith("nvidia-h100-80gb-hbm3-sm90-")
    assert rt.device_key("NVIDIA H200", (9, 0), "2.11.0+cu130", "13.0") != base
    assert rt.device_key("NVIDIA H100 80GB HBM3", (9, 0), "2.13.0+cu130", "13.0") != base
    assert rt.device_key("NVIDIA H100 80GB HBM3", (9, 0), "2.11.0+cu130", "13.0") == base


def test_entry_point_merge_keeps_release_entries() -> None:
    text = "[console_scripts]\nvllm = vllm.entrypoints.cli.main:main\n\n[vllm.general_plugins]\nlora = x:y\n"
    out = add_entry_point(text)
    assert "vllm = vllm.entrypoints.cli.main:main" in out and "lora = x:y" in out and has_entry_point(out)
    assert has_entry_point(add_entry_point("")) and not has_entry_point(text)


def test_forged_wheel_carries_runtime(forged_tune_wheel: Path | None = None) -> None:
    from vllm_forge.build import build
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        whl = build("0.25.1", Path(tmp)).wheel
        with zipfile.ZipFile(whl) as zf:
            di = next(n.split("/")[0] for n in zf.namelist() if n.endswith(".dist-info/RECORD"))
            assert zf.read("vllm/_forge_runtime.py") == (REPO / "vllm_overlay" / "runtime" / "_forge_runtime.py").read_bytes()
            assert has_entry_point(zf.read(f"{di}/entry_points.txt").decode())
        nort = build("0.25.1", Path(tmp), runtime=False).wheel
        assert ".nort" in nort.name and nort.name != whl.name
        with zipfile.ZipFile(nort) as zf:
            assert "vllm/_forge_runtime.py" not in zf.namelist()


# ---------------------------------------------------------------- serving warm-up
def test_warmup_lengths_cover_triton_specialisations() -> None:
    long_, short = rt.warmup_lengths(16384, 8448)
    assert (long_ + short) % 16 == 0 and long_ + 2 <= 8448 - 1 and long_ + short <= 16384
    assert rt.warmup_lengths(8192, 131072) == (8175, 17)
    assert rt.warmup_lengths(32, 32) is None  # too small for a long and a short prompt


def _fake_worker(calls: list, **over: object) -> object:
    import types
    group = lambda bs: types.SimpleNamespace(kv_cache_spec=types.SimpleNamespace(block_size=bs))  # noqa: E731
    runner = types.SimpleNamespace(kv_cache_config=types.SimpleNamespace(kv_cache_groups=[group(32), group(64)],
                                                                         num_blocks=over.pop("num_blocks", 10000)),
                                   model_config=types.SimpleNamespace(get_vocab_size=lambda: 1000),
                                   is_pooling_model=False)
    cfg = types.SimpleNamespace(parallel_config=types.SimpleNamespace(pipeline_parallel_size=over.pop("pp", 1)),
                                speculative_config=over.pop("spec", None), kv_transfer_config=None,
                                scheduler_config=types.SimpleNamespace(max_num_batched_tokens=4096),
                                model_config=types.SimpleNamespace(max_model_len=2048))

    class Worker:
        model_runner, vllm_config = runner, cfg

        def execute_model(self, so: object) -> None:
            calls.append(("execute", so))

        def sample_tokens(self, grammar: object) -> None:
            calls.append(("sample", grammar))
    return Worker()


def test_serving_warmup_skips_what_it_cannot_drive(caplog) -> None:  # type: ignore[no-untyped-def]
    import logging
    caplog.set_level(logging.INFO, logger="vllm.forge_runtime")
    for over, reason in (({"pp": 2}, "pipeline parallelism"), ({"spec": object()}, "speculative decoding")):
        calls: list = []
        rt.serving_warmup(_fake_worker(calls, **over))
        assert calls == [] and f"serving warm-up skipped ({reason})" in caplog.text


def test_jit_monitor_starts_after_the_warmup(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """vLLM's warm-up ends by starting its JIT monitor: the serving warm-up runs right before it (so its
    compiles are not reported as compiles during inference), once, and the monitor still starts."""
    import types
    order: list[str] = []
    mod = types.ModuleType("vllm.utils.jit_monitor")
    mod.activate = lambda mode=None: order.append(f"monitor {mode}")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm.utils.jit_monitor", mod)
    monkeypatch.setattr(rt, "JIT_MONITORS", ("vllm.utils.jit_monitor",))
    with rt._BeforeJitMonitor(lambda: order.append("warm-up")):
        sys.modules["vllm.utils.jit_monitor"].activate(mode="warn")  # what vLLM's compile_or_warm_up_model does
        order.append("freeze")
    assert order == ["warm-up", "monitor warn", "freeze"]
    order.clear()
    with rt._BeforeJitMonitor(lambda: order.append("warm-up")):  # a release without the monitor call
        order.append("capture")
    assert order == ["capture", "warm-up"] and mod.activate.__name__ == "<lambda>"


STEP_API = {  # what serving_steps uses of vLLM's scheduler output and request classes
    "vllm/v1/core/sched/output.py": {
        "SchedulerOutput": {"make_empty", "scheduled_new_reqs", "scheduled_cached_reqs", "num_scheduled_tokens",
                            "total_num_scheduled_tokens", "num_common_prefix_blocks", "finished_req_ids"},
        "CachedRequestData": {"make_empty", "req_ids", "num_computed_tokens", "num_output_tokens", "new_block_ids"},
        "NewRequestData": {"from_request"},
    },
    "vllm/v1/request.py": {"Request": {"__init__"}},
    "vllm/v1/worker/gpu_worker.py": {"Worker": {"execute_model", "sample_tokens", "compile_or_warm_up_model"}},
}


def test_serving_steps_match_each_release_api(pins) -> None:  # type: ignore[no-untyped-def]
    """The warm-up builds what vLLM's scheduler sends: the fields and methods it sets exist in the
    real sources of every release whose wheel the tests download (parsed, not imported)."""
    import ast

    checked = []
    for version in ("0.17.0", "0.19.1", "0.22.1", "0.25.1", "0.33.0"):
        with zipfile.ZipFile(real_wheel(version)) as zf:
            for member, classes in STEP_API.items():
                tree = ast.parse(zf.read(member))
                for cls, needed in classes.items():
                    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
                    names = {n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
                    names |= {n.target.id for n in node.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
                    assert needed <= names, f"{version} {cls} lacks {needed - names}"
                    if cls == "Request":
                        init = next(n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
                        assert [a.arg for a in init.args.args[1:5]] == ["request_id", "prompt_token_ids",
                                                                        "sampling_params", "pooling_params"], version
                    if cls == "NewRequestData":
                        fr = next(n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "from_request")
                        assert {"request", "block_ids", "prefill_token_ids"} <= {a.arg for a in fr.args.args}, version
        checked.append(version)
    assert len(checked) == 5


KERNEL_PAGE_PROBE = PAGES_PROBE.split("cfg = types")[0] + r"""
for dt in ("auto", "fp8"):
    cfg = types.SimpleNamespace(cache_config=types.SimpleNamespace(block_size=16, skip_page_size_padded=None,
                                                                   cache_dtype=dt),
                                model_config=types.SimpleNamespace(use_mla=False))
    g = layer(4, 512, None)
    g.kv_cache_dtype, g.kv_cache_torch_dtype = dt, torch.uint8 if dt == "fp8" else torch.bfloat16
    print(dt, rt._kernel_page(cfg, {"global": g}, {"global"}))
"""


@pytest.mark.network
@pytest.mark.parametrize("version, fp8", [("0.25.1", None), ("0.33.0", 64)])
def test_upstream_fp8_kernel_page_is_kept(version: str, fp8: int | None, tmp_path: Path) -> None:
    """0.31.0 on, vLLM's own FLASH_ATTN backend pins the kernel page of SM90 head-512 layers with an fp8
    KV cache at 64 (its FP8-KV kernel's tile): the runtime layer sees that through the backend's own
    get_supported_kernel_block_sizes(spec) and keeps vLLM's block size; bf16, and releases before the rule,
    leave the choice to the runtime layer."""
    out = run_on_release(real_wheel(version), tmp_path, KERNEL_PAGE_PROBE,
                         str(REPO / "vllm_overlay" / "runtime" / "_forge_runtime.py"))
    assert out[-2:] == ["auto None", f"fp8 {fp8}"]


def _cache_in(layout: str, blocks: int = 3, page: int = 64, heads: int = 4, head: int = 8):
    """A KV cache tensor in one of vLLM's FLASH_ATTN layouts, K all 1 and V all 2 (as each release's forward
    splits it)."""
    import torch

    if layout == "kv-first":  # 0.20-0.22: (2, blocks, page, heads, head), unbind(0)
        kv = torch.stack([torch.ones(blocks, page, heads, head), 2 * torch.ones(blocks, page, heads, head)])
    elif layout == "blocks-first":  # 0.23-0.25: (blocks, 2, page, heads, head), unbind(1)
        kv = torch.stack([torch.ones(blocks, page, heads, head), 2 * torch.ones(blocks, page, heads, head)], dim=1)
    else:  # 0.26 on: (blocks, heads, page, 2 * head), transpose(1, 2).split(head, -1)
        kv = torch.cat([torch.ones(blocks, heads, page, head), 2 * torch.ones(blocks, heads, page, head)], dim=-1)
    return kv.to(torch.bfloat16)


@pytest.mark.parametrize("layout", ["kv-first", "blocks-first", "heads-inner"])
def test_kv_views_of_each_layout(layout: str) -> None:
    """The FA4 start-up compile finds K and V in every KV cache layout vLLM's FLASH_ATTN has had (it looked for
    the first one only, so from 0.23.0 on it warmed nothing and said nothing: no 'FA4 warm-up' line in the
    0.25.1 H200 run, docs/data/e2e-2026-12-01-h200)."""
    k, v = rt.kv_views(_cache_in(layout), 8)
    assert tuple(k.shape) == tuple(v.shape) == (3, 64, 4, 8)
    assert bool((k == 1).all()) and bool((v == 2).all())
    layer = types.SimpleNamespace(kv_cache=[_cache_in(layout)], impl=types.SimpleNamespace(
        vllm_flash_attn_version=4, head_size=8, num_heads=32, sliding_window=None, logits_soft_cap=0.0))
    shapes, skipped = rt.fa4_layer_shapes({"model.layers.5.self_attn.attn": layer})
    assert not skipped and [key[1:5] for key in shapes] == [(64, 4, 8, 32)]


def test_kv_views_refuses_what_it_cannot_tell() -> None:
    import torch

    assert rt.kv_views(torch.zeros(2, 2, 16, 4, 8), 8) is None  # 2 blocks: either 5-D layout
    assert rt.kv_views(torch.zeros(3, 4, 16, 24), 8) is None   # not 2 x head
    fp8 = types.SimpleNamespace(kv_cache=[_cache_in("heads-inner").to(torch.uint8)], impl=types.SimpleNamespace(
        vllm_flash_attn_version=4, head_size=8, num_heads=32, sliding_window=None, logits_soft_cap=0.0))
    shapes, skipped = rt.fa4_layer_shapes({"g": fp8})
    assert not shapes and skipped == ["g [3, 4, 64, 16] uint8"]


@pytest.mark.network
def test_every_release_splits_its_kv_cache_as_kv_views_knows() -> None:
    """Each pinned release's FLASH_ATTN forward splits the KV cache in one of the three ways kv_views handles
    (read from the release's sdist): a release with a fourth layout fails here, at pin time."""
    import tarfile

    from vllm_forge.fetch import cached_download
    from vllm_forge.pins import load_pins

    from conftest import index

    known = {"kv_cache.unbind(0)", "kv_cache.unbind(1)", "kv_cache.transpose(1, 2).split(self.head_size, dim=-1)"}
    pins = load_pins()
    seen = {}
    for version, vp in pins.vllm.items():
        if vp.plan != "tune":
            continue
        with tarfile.open(cached_download(index, pins.index_project, vp.sdist, vp.sdist_sha256)) as tf:
            member = next(m for m in tf.getmembers() if m.name.endswith("vllm/v1/attention/backends/flash_attn.py"))
            src = tf.extractfile(member).read().decode()  # type: ignore[union-attr]
        splits = set(re.findall(r"key_cache, value_cache = (kv_cache\.[^\n]+)", src))
        assert splits and splits <= known, (version, splits)
        seen[version] = splits.pop()
    assert seen["0.22.1"] == "kv_cache.unbind(0)" and seen["0.25.1"] == "kv_cache.unbind(1)"
    assert seen["0.33.0"].startswith("kv_cache.transpose")
