"""System FA4: the flash-attn-4 wheel of the pin (build-fa4-wheel) and --fa4 system|both vLLM wheels."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import pytest
from conftest import run_cli
from installer.sources import WheelFile
from test_fa4_sources import _real_patch

from vllm_forge.build import BuildResult, build
from vllm_forge.fa4 import CUTE, WHEEL_CUTE, tree_sha256, zip_tree
from vllm_forge.fa4_wheel import build_fa4_wheel
from vllm_forge.pins import Pins
from vllm_forge.verify import verify_wheel


def test_fa4_wheel_contents_and_reproducible(tmp_path: Path, pins: Pins, forged: BuildResult) -> None:
    one = build_fa4_wheel(tmp_path / "one")
    two = build_fa4_wheel(tmp_path / "two")
    # the shipped patch series makes it another build of the pin: .p<hash7> of the series
    assert re.fullmatch(r"4\.0\.0b12\+vllm\.bce2942\.p[0-9a-f]{7}", one.version), one.version
    assert one.wheel.name == f"flash_attn_4-{one.version}-py3-none-any.whl"
    assert one.wheel.read_bytes() == two.wheel.read_bytes()
    with WheelFile.open(one.wheel) as w:
        w.validate_record()
    with zipfile.ZipFile(one.wheel) as zf:
        cute = zip_tree(zf, CUTE)
        meta = zf.read(f"flash_attn_4-{one.version}.dist-info/METADATA").decode()
        assert zf.getinfo(f"{CUTE}/interface.py").date_time[:3] == (2026, 5, 12)  # the pin's commit date
    assert len(cute) == pins.fa.cute_file_count
    assert b"from flash_attn.cute" in cute["interface.py"]  # upstream imports, not vLLM's
    rewritten = {k: v.replace(b"flash_attn.cute", b"vllm.vllm_flash_attn.cute") for k, v in cute.items()}
    # the same patched tree as the forged vLLM wheel's bundled FA4
    assert tree_sha256(rewritten) == json.loads(forged.manifest.read_text())["flash_attention"]["tree_sha256"]
    assert "Name: flash-attn-4\n" in meta and "Requires-Dist: quack-kernels>=0.4.0\n" in meta


def test_fa4_wheel_with_patches_has_its_own_version(tmp_path: Path, fa_upstream: Path) -> None:
    patches = tmp_path / "patches"
    patches.mkdir()
    (patches / "0001-x.patch").write_text(_real_patch(fa_upstream))
    result = build_fa4_wheel(tmp_path / "out", fa_patch_dir=patches)
    prefix = "4.0.0b12+vllm.bce2942.p"
    assert result.version.startswith(prefix) and len(result.version) == len(prefix) + 7


@pytest.mark.parametrize("mode", ["system", "both"])
def test_vllm_wheel_modes(tmp_path: Path, mode: str) -> None:
    result = build("0.19.1", tmp_path, fa4_mode=mode)
    assert f"+fa4.bce2942.p952cdd5.{mode}.gemma4-" in result.wheel.name
    verify_wheel(result.wheel, deep=False)
    with zipfile.ZipFile(result.wheel) as zf:
        names = zf.namelist()
        di = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        meta = zf.read(f"{di}/METADATA").decode()
        assert "vllm/vllm_flash_attn/forge_system_fa4.py" in names
        assert b"use_system_flash_attn: bool = False" in zf.read("vllm/config/attention.py")
    bundled = [n for n in names if n.startswith(WHEEL_CUTE + "/")]
    if mode == "system":
        assert bundled == [] and re.search(r"Requires-Dist: flash-attn-4==4\.0\.0b12\+vllm\.bce2942\.p[0-9a-f]{7}\n",
                                           meta), meta
    else:
        assert len(bundled) == 48 and "flash-attn-4" not in meta
    m = json.loads(result.manifest.read_text())
    assert m["fa4_mode"] == mode and m["overlay"]["layers"] == ["fa4-sm90-hd512", "system-fa4", "gemma4-fa4"]


def test_system_layer_refuses_0_18_1_clearly(tmp_path: Path) -> None:
    from conftest import real_wheel

    real_wheel("0.18.1")
    r = run_cli("build", "--vllm", "0.18.1", "--fa4", "both", "--out", str(tmp_path / "out"))
    assert r.returncode == 2
    assert "drifted base file vllm/" in r.stderr and "overlay system-fa4 was made for" in r.stderr
