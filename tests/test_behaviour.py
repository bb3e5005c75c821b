"""The overlay's behaviour, on the real vLLM package of the forged wheel.

The wheel is installed with pip (--no-deps, into a temporary --target); vLLM's own modules are
imported from there. Only the device (a vLLM Platform reporting a compute capability) and the
availability of the compiled FA2/FA3 extensions and of FA4's CuTe kernels are faked: there is no
GPU here.
"""

from __future__ import annotations

import importlib.machinery
import shutil
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vllm_forge.build import BuildResult

from fake_gpu import install

torch = pytest.importorskip("torch")


@pytest.fixture(scope="session")
def vllm(forged_for_behaviour: BuildResult,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[types.SimpleNamespace]:
    site = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--no-index",
                    "--target", str(site), str(forged_for_behaviour.wheel)], check=True)
    dist_info = forged_for_behaviour.wheel.name.split("-")[:2]
    assert (site / f"{'-'.join(dist_info)}.dist-info").is_dir()
    sys.path.insert(0, str(site))
    FakeGpu, DeviceCapability = install()
    import vllm.vllm_flash_attn.flash_attn_interface as fi
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.config.attention import AttentionConfig
    from vllm.v1.attention.backends import fa_utils, flash_attn

    assert Path(fa_utils.__file__).is_relative_to(site)
    yield types.SimpleNamespace(fi=fi, fa_utils=fa_utils, flash_attn=flash_attn, FakeGpu=FakeGpu,
                                DeviceCapability=DeviceCapability, VllmConfig=VllmConfig,
                                AttentionConfig=AttentionConfig, set_config=set_current_vllm_config)
    sys.path.remove(str(site))
    shutil.rmtree(site, ignore_errors=True)


@pytest.fixture
def gpu(vllm: types.SimpleNamespace, monkeypatch: pytest.MonkeyPatch):
    """Set the fake device's capability and FA4 availability for one test."""

    def set_device(major: int, fa4: bool = True) -> types.SimpleNamespace:
        monkeypatch.setattr(vllm.FakeGpu, "capability", vllm.DeviceCapability(major, 0))
        if not fa4:  # otherwise as the wheel has it: bundled cute/interface.py present or not
            monkeypatch.setattr(vllm.fi, "FA4_AVAILABLE", False)
        vllm.fa_utils.fa4_supported.cache_clear()
        return vllm

    yield set_device
    vllm.fa_utils.fa4_supported.cache_clear()


def impl(v: types.SimpleNamespace, head_size: int) -> Any:
    return v.flash_attn.FlashAttentionImpl(num_heads=32, head_size=head_size, scale=head_size ** -0.5,
                                           num_kv_heads=4, alibi_slopes=None, sliding_window=None,
                                           kv_cache_dtype="auto")


def test_sm90_head512_with_fa4_selects_fa4(gpu) -> None:
    v = gpu(9)
    assert v.flash_attn.FlashAttentionBackend.supports_head_size(512)
    assert v.flash_attn.FlashAttentionBackend.supports_head_size(320)
    assert not v.flash_attn.FlashAttentionBackend.supports_head_size(516)  # not a multiple of 8
    assert not v.flash_attn.FlashAttentionBackend.supports_head_size(520)  # over 512
    assert v.fa_utils.get_flash_attn_version(head_size=512) == 4
    assert impl(v, 512).vllm_flash_attn_version == 4


def test_sm90_head512_without_fa4_unsupported(gpu) -> None:
    v = gpu(9, fa4=False)
    assert not v.flash_attn.FlashAttentionBackend.supports_head_size(512)
    assert v.flash_attn.FlashAttentionBackend.supports_head_size(256)
    assert v.fa_utils.get_flash_attn_version(head_size=512) == 3


def test_sm90_small_heads_stay_fa3(gpu) -> None:
    v = gpu(9)
    for h in (64, 128, 256):
        assert v.fa_utils.get_flash_attn_version(head_size=h) == 3
        assert impl(v, h).vllm_flash_attn_version == 3
    assert v.fa_utils.get_flash_attn_version() == 3  # no head size: platform default


def test_explicit_version_wins(gpu) -> None:
    v = gpu(9)
    with v.set_config(v.VllmConfig(attention_config=v.AttentionConfig(flash_attn_version=3))):
        assert v.fa_utils.get_flash_attn_version(head_size=512) == 3
        # FA3 cannot run head 512, and the user asked for FA3: FLASH_ATTN is not offered for it
        assert not v.flash_attn.FlashAttentionBackend.supports_head_size(512)
    with v.set_config(v.VllmConfig(attention_config=v.AttentionConfig(flash_attn_version=4))):
        assert v.fa_utils.get_flash_attn_version(head_size=128) == 4
        assert v.flash_attn.FlashAttentionBackend.supports_head_size(512)


def test_sm100_unchanged(gpu) -> None:
    v = gpu(10)
    assert v.fa_utils.get_flash_attn_version(head_size=128) == 4
    assert v.fa_utils.get_flash_attn_version(head_size=512) == 2  # TMEM limit: 0.19.1's FA2 fallback
    assert not v.flash_attn.FlashAttentionBackend.supports_head_size(512)
    assert v.flash_attn.FlashAttentionBackend.supports_head_size(256)


def test_head_size_reaches_every_decision(gpu) -> None:
    """The PR review remark: no head-size decision may fall back to the platform default."""
    v = gpu(9)
    spec = types.SimpleNamespace(head_size=512)
    support = v.flash_attn.FlashAttentionMetadataBuilder.get_cudagraph_support(None, spec)
    assert support == v.flash_attn.AttentionCGSupport.UNIFORM_BATCH  # FA4, not FA3's ALWAYS
    spec.head_size = 128
    assert v.flash_attn.FlashAttentionMetadataBuilder.get_cudagraph_support(None, spec) == \
        v.flash_attn.AttentionCGSupport.ALWAYS
    assert not v.fa_utils.flash_attn_supports_fp8(512) and v.fa_utils.flash_attn_supports_fp8(128)
    with pytest.raises(NotImplementedError, match="fp8 kv-cache"):
        v.flash_attn.FlashAttentionImpl(num_heads=32, head_size=512, scale=1.0, num_kv_heads=4, alibi_slopes=None,
                                        sliding_window=None, kv_cache_dtype="fp8")


def test_fa4_support_decided_once(gpu) -> None:
    v = gpu(9)
    for _ in range(50):
        assert v.flash_attn.FlashAttentionBackend.supports_head_size(512)
        assert v.fa_utils.get_flash_attn_version(head_size=512) == 4
    info = v.fa_utils.fa4_supported.cache_info()
    assert (info.misses, info.hits) == (1, 99)


class _NoPlatform:
    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"platform looked up in the attention call path ({name})")


@pytest.fixture
def fake_cute(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """FA4's kernels need a GPU and the CuTe DSL: stand in for vllm.vllm_flash_attn.cute.interface."""
    seen: list[dict[str, Any]] = []

    def _flash_attn_fwd(q, k, v, **kw):  # type: ignore[no-untyped-def]
        seen.append(kw)
        return kw["out"], None

    mod = types.ModuleType("vllm.vllm_flash_attn.cute.interface")
    mod._flash_attn_fwd = _flash_attn_fwd  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm.vllm_flash_attn.cute.interface", mod)
    return seen


def test_paged_fa4_call_reaches_kernel_on_sm90(gpu, fake_cute: list[dict[str, Any]], monkeypatch) -> None:
    v = gpu(9)
    monkeypatch.setattr(v.fi, "_FA4_FWD", None)
    q = torch.zeros(5, 32, 512, dtype=torch.bfloat16)
    kv = torch.zeros(4, 16, 4, 512, dtype=torch.bfloat16)  # 4 pages of 16 tokens
    block_table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    args = dict(max_seqlen_q=4, cu_seqlens_q=torch.tensor([0, 1, 5], dtype=torch.int32), max_seqlen_k=20,
                seqused_k=torch.tensor([17, 20], dtype=torch.int32), block_table=block_table, causal=True,
                fa_version=4, out=torch.empty_like(q))
    v.fi.flash_attn_varlen_func(q, kv, kv, **args)
    assert fake_cute[-1]["page_table"] is block_table
    assert fake_cute[-1]["seqused_k"] is args["seqused_k"]
    # resolved once: neither the module nor the platform is looked up again on later calls
    sys.modules.pop("vllm.vllm_flash_attn.cute.interface")
    import vllm.platforms as platforms
    monkeypatch.setattr(platforms, "_current_platform", _NoPlatform())
    v.fi.flash_attn_varlen_func(q, kv, kv, **args)
    assert len(fake_cute) == 2


def test_fa4_refuses_mla_q_v(gpu, fake_cute: list[dict[str, Any]], monkeypatch) -> None:
    """MLA's q_v has no FA4 path: refused with a clear error instead of silently dropped."""
    v = gpu(9)
    monkeypatch.setattr(v.fi, "_FA4_FWD", None)
    q = torch.zeros(2, 16, 512, dtype=torch.bfloat16)
    kv = torch.zeros(2, 16, 1, 512, dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError, match="FA4 does not take q_v"):
        v.fi.flash_attn_varlen_func(q, kv, kv, max_seqlen_q=1, cu_seqlens_q=torch.tensor([0, 1, 2], dtype=torch.int32),
                                    max_seqlen_k=16, seqused_k=torch.tensor([3, 4], dtype=torch.int32),
                                    block_table=torch.tensor([[0], [1]], dtype=torch.int32), q_v=q, fa_version=4)
    assert fake_cute == []


# --- system FA4 (wheels forged with --fa4 both|system; run by test_versions in a subprocess) ---

@pytest.fixture
def system_fa4(vllm: types.SimpleNamespace, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    mode = request.config.getoption("--forge-fa4")
    if mode == "bundled":
        pytest.skip("needs a wheel forged with --fa4 both|system (see test_versions.py)")
    import vllm.vllm_flash_attn.forge_system_fa4 as sf

    def install(accepts_head_512: bool | None) -> list[dict[str, Any]]:
        """None: no flash_attn installed. Otherwise a stand-in flash_attn.cute with the
        pinned FA4's head-dim check (True) or PyPI flash-attn-4 4.0.0b36's (False)."""
        seen: list[dict[str, Any]] = []
        monkeypatch.setattr(sf, "_choice", None)
        sf.unusable_reason.cache_clear()
        vllm.fa_utils.fa4_supported.cache_clear()
        monkeypatch.setattr(vllm.fi, "_FA4_FWD", None)
        for name in ("flash_attn", "flash_attn.cute", "flash_attn.cute.interface"):
            monkeypatch.delitem(sys.modules, name, raising=False)
        if accepts_head_512 is None:
            return seen
        limit = 512 if accepts_head_512 else 256

        def _validate_head_dims(head_dim: int, head_dim_v: int, cc: int, alignment: int) -> None:
            assert cc != 9 or (8 <= head_dim <= limit and 8 <= head_dim_v <= limit), f"must be <= {limit}"

        def _flash_attn_fwd(q, k, v, **kw):  # type: ignore[no-untyped-def]
            seen.append(kw)
            return kw["out"], None

        for name in ("flash_attn", "flash_attn.cute", "flash_attn.cute.interface"):
            mod = types.ModuleType(name)
            mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
            mod.__path__ = []  # type: ignore[attr-defined]
            monkeypatch.setitem(sys.modules, name, mod)
        iface = sys.modules["flash_attn.cute.interface"]
        iface._validate_head_dims = _validate_head_dims  # type: ignore[attr-defined]
        iface._flash_attn_fwd = _flash_attn_fwd  # type: ignore[attr-defined]
        monkeypatch.setattr(sf.inspect, "getsource", lambda m: "stand-in source")
        return seen

    yield types.SimpleNamespace(mode=mode, sf=sf, install=install)
    vllm.fa_utils.fa4_supported.cache_clear()


def _paged_call(v: types.SimpleNamespace) -> None:
    q = torch.zeros(2, 32, 512, dtype=torch.bfloat16)
    kv = torch.zeros(2, 16, 4, 512, dtype=torch.bfloat16)
    v.fi.flash_attn_varlen_func(q, kv, kv, max_seqlen_q=1, cu_seqlens_q=torch.tensor([0, 1, 2], dtype=torch.int32),
                                max_seqlen_k=16, seqused_k=torch.tensor([3, 4], dtype=torch.int32),
                                block_table=torch.tensor([[0], [1]], dtype=torch.int32), fa_version=4,
                                out=torch.empty_like(q))


def test_system_fa4_requested_by_env(gpu, system_fa4, monkeypatch) -> None:
    v = gpu(9)
    seen = system_fa4.install(accepts_head_512=True)
    monkeypatch.setenv("VLLM_USE_SYSTEM_FLASH_ATTN", "1")
    assert impl(v, 512).fa4_implementation == "system"
    _paged_call(v)
    assert seen and seen[0]["page_table"] is not None


def test_system_fa4_requested_by_config(gpu, system_fa4, monkeypatch) -> None:
    v = gpu(9)
    system_fa4.install(accepts_head_512=True)
    monkeypatch.delenv("VLLM_USE_SYSTEM_FLASH_ATTN", raising=False)
    with v.set_config(v.VllmConfig(attention_config=v.AttentionConfig(use_system_flash_attn=True))):
        assert system_fa4.sf.choose() == "system"


def test_system_fa4_not_requested(gpu, system_fa4, monkeypatch) -> None:
    gpu(9)
    system_fa4.install(accepts_head_512=True)
    monkeypatch.delenv("VLLM_USE_SYSTEM_FLASH_ATTN", raising=False)
    assert system_fa4.sf.choose() == ("bundled" if system_fa4.mode == "both" else "system")


@pytest.mark.parametrize("installed", [None, False], ids=["missing", "pypi-b36-limits-256"])
def test_unusable_system_fa4_falls_back(gpu, system_fa4, monkeypatch, installed, caplog) -> None:
    v = gpu(9)
    system_fa4.install(accepts_head_512=installed)
    monkeypatch.setenv("VLLM_USE_SYSTEM_FLASH_ATTN", "1")
    fallback = "bundled" if system_fa4.mode == "both" else "none"
    assert system_fa4.sf.choose() == fallback
    assert system_fa4.sf.unusable_reason() is not None
    # without any FA4, head 512 is not offered on FLASH_ATTN; with the bundled one it is
    assert v.flash_attn.FlashAttentionBackend.supports_head_size(512) == (fallback == "bundled")
    assert system_fa4.sf.choose() == fallback  # decided once
