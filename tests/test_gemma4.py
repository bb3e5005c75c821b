"""Gemma-4 on FA4 by default: the gemma4-fa4 layer of forged 0.19.0-0.23.0 wheels.

Which releases get it is data (the overlay manifest's base hashes of
vllm/model_executor/models/config.py); these tests hold that data against every release's real
config.py, and run the real Gemma4Config of stock and forged wheels on a faked SM90 device.
"""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vllm_forge.build import BuildResult, build
from vllm_forge.fetch import Index
from vllm_forge.overlay import gemma4_fa4_for, made_for
from vllm_forge.pins import GEMMA4_LAYER, load_pins

from conftest import real_wheel, run_cli, run_on_release, scratch

CONFIG = "vllm/model_executor/models/config.py"


def forces_triton(source: str) -> bool:
    """The release's own Gemma4Config sends heterogeneous head dims to TRITON_ATTN even where FA4 runs."""
    block = source[source.find("class Gemma4Config"):]
    block = block[:block.find("\nclass ", 1)]
    return "TRITON_ATTN" in block and "is_fa_version_supported(4)" not in block


@pytest.mark.network
def test_layer_is_made_for_exactly_the_releases_that_force_triton() -> None:
    """Every pinned release's config.py, read from its wheel on the index by range requests."""
    pins, index = load_pins(), Index()
    forcing = []
    for version, vpin in pins.vllm.items():
        with zipfile.ZipFile(index.open_remote(pins.index_project, vpin.wheel, vpin.wheel_sha256)) as zf:
            try:
                source = zf.read(CONFIG).decode()
            except KeyError:
                continue
        if forces_triton(source):
            forcing.append(version)
    assert forcing == made_for(GEMMA4_LAYER)
    assert forcing[0] == "0.19.0" and forcing[-1] == "0.23.0"
    assert all(gemma4_fa4_for(v, None) == (v in forcing) for v in pins.vllm)


def test_explicit_layer_on_another_release_is_refused(tmp_path: Path) -> None:
    r = run_cli("build", "--vllm", "0.25.1", "--gemma4-fa4", "--out", str(tmp_path / "out"))
    assert r.returncode == 2
    assert r.stderr.startswith("vllm-forge: error: --gemma4-fa4: vLLM 0.25.1 does not force TRITON_ATTN")
    assert " -- build without --gemma4-fa4" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# What Gemma4Config decides, run in a fresh interpreter on a release's real vLLM package (CPU, a faked
# device: conftest.FAKE_GPU_PRELUDE; FA4 is as the wheel has it unless a case removes it).
PROBE = r"""
import json, logging, os
import vllm.vllm_flash_attn.flash_attn_interface as fi
from transformers import PretrainedConfig
from vllm.config.attention import AttentionConfig
from vllm.model_executor.models.config import Gemma4Config
from vllm.v1.attention.backends.registry import AttentionBackendEnum as B

lines = []
class Keep(logging.Handler):
    def emit(self, record):
        lines.append(record.getMessage())
logging.getLogger("vllm").addHandler(Keep())

def decide(head_dim=256, global_head_dim=512, major=9, fa4=True, cache_dtype="auto", env=None, **attention):
    FakeGpu.capability = DeviceCapability(major, 0)
    fi.FA4_AVAILABLE = fa4 and os.path.exists(os.path.join(os.path.dirname(fi.__file__), "cute", "interface.py"))
    os.environ.pop("VLLM_FORGE_GEMMA4_FA4", None)
    os.environ.update(env or {})
    text = PretrainedConfig(model_type="gemma4_text", head_dim=head_dim, global_head_dim=global_head_dim,
                            num_attention_heads=32, num_key_value_heads=4)
    cfg = types.SimpleNamespace(model_config=types.SimpleNamespace(hf_text_config=text),
                                attention_config=AttentionConfig(**attention),
                                cache_config=types.SimpleNamespace(cache_dtype=cache_dtype))
    del lines[:]
    Gemma4Config.verify_and_update_config(cfg)
    a = cfg.attention_config
    return [a.backend.name if a.backend is not None else None, a.flash_attn_version,
            [l for l in lines if "Gemma4" in l]]

print(json.dumps({
    "sm90": decide(),
    "opt-out": decide(env={"VLLM_FORGE_GEMMA4_FA4": "0"}),
    "user-fa3": decide(flash_attn_version=3),
    "user-fa4": decide(flash_attn_version=4),
    "user-backend": decide(backend=B.FLEX_ATTENTION),
    "sm100": decide(major=10),
    "no-fa4": decide(fa4=False),
    "fp8-kv": decide(cache_dtype="fp8"),
    "uniform": decide(head_dim=256, global_head_dim=256),
}))
"""


def decisions(wheel: Path, tmp_path: Path) -> dict[str, list]:
    return json.loads(run_on_release(wheel, tmp_path, PROBE)[-1])  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def forged_0_22_1(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BuildResult]:
    with scratch(tmp_path_factory, "forged-0.22.1") as out:
        yield build("0.22.1", out)


@pytest.mark.network
def test_stock_0_22_1_forces_triton_even_with_fa4(tmp_path: Path) -> None:
    got = decisions(real_wheel("0.22.1"), tmp_path)
    assert got["sm90"][:2] == ["TRITON_ATTN", None]
    assert got["user-fa4"][:2] == ["TRITON_ATTN", 4]


@pytest.mark.network
@pytest.mark.parametrize("release", ["0.22.1", "0.19.1"])
def test_forged_wheel_runs_gemma4_on_fa4_by_default(release: str, forged_0_22_1: BuildResult,
                                                     forged_for_behaviour: BuildResult, tmp_path: Path) -> None:
    forged = forged_0_22_1 if release == "0.22.1" else forged_for_behaviour
    assert re.search(r"\.gemma4(\.|-)", forged.wheel.name), forged.wheel.name
    stamp = json.loads(forged.manifest.read_text())
    assert GEMMA4_LAYER in stamp["overlay"]["layers"]
    got = decisions(forged.wheel, tmp_path)
    backend, version, log = got["sm90"]
    assert (backend, version) == ("FLASH_ATTN", 4)
    assert len(log) == 1 and log[0].startswith("vllm-forge: Gemma4") and "FlashAttention 4 for all layers" in log[0]
    assert got["user-fa4"][:2] == ["FLASH_ATTN", 4]
    for case, why in (("opt-out", "VLLM_FORGE_GEMMA4_FA4=0"), ("user-fa3", "flash_attn_version=3"),
                      ("sm100", "not SM90"), ("no-fa4", "FA4 is not available"), ("fp8-kv", "kv_cache_dtype=fp8")):
        backend, version, log = got[case]
        assert backend == "TRITON_ATTN", case  # the release's own behaviour, and one line that says why
        assert any(why in line and line.startswith("vllm-forge: Gemma4 keeps") for line in log), (case, log)
    assert got["user-backend"][:2] == ["FLEX_ATTENTION", None]
    assert got["uniform"] == [None, None, []]


@pytest.mark.network
def test_opt_out_build_carries_the_release_behaviour(tmp_path: Path) -> None:
    r = run_cli("build", "--vllm", "0.19.1", "--no-gemma4-fa4", "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    wheel = Path(r.stdout.strip().splitlines()[-1])
    assert ".gemma4" not in wheel.name
    with zipfile.ZipFile(wheel) as zf, zipfile.ZipFile(real_wheel("0.19.1")) as base:
        assert zf.read(CONFIG) == base.read(CONFIG)
