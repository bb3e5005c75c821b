"""The version matrix: 0.18.1 (its own overlay, made by refresh), 0.19.0 (0.19.1's base files),
0.22.0 (already carries the fix), and `vllm-forge refresh` on the real wheels."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import copy_data, real_wheel, run_cli

from vllm_forge.build import build
from vllm_forge.errors import ForgeError
from vllm_forge.overlay import load_overlay
from vllm_forge.pins import load_pins
from vllm_forge.refresh import refresh
from vllm_forge.verify import verify_wheel

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("version", ["0.17.0", "0.18.1", "0.19.0"])
def test_build_and_verify(version: str, tmp_path: Path) -> None:
    real_wheel(version)
    result = build(version, tmp_path)
    gemma4 = version == "0.19.0"  # 0.17.x/0.18.x have no Gemma-4
    assert result.wheel.name.startswith(f"vllm-{version}+fa4.bce2942.p952cdd5{'.gemma4' * gemma4}-")
    verify_wheel(result.wheel, deep=True)


def test_0_19_0_reuses_0_19_1_overlay_by_hash() -> None:
    pins = load_pins()
    assert pins.vllm["0.19.0"].overlay == pins.vllm["0.19.1"].overlay
    overlay = load_overlay(pins.vllm["0.19.0"].overlay)
    files = {}
    for v in ("0.19.0", "0.19.1"):
        with zipfile.ZipFile(real_wheel(v)) as zf:
            files[v] = {p: hashlib.sha256(zf.read(p)).hexdigest() for p in overlay.paths}
    assert files["0.19.0"] == files["0.19.1"]
    assert all(overlay.overlay_id in overlay.bases[s]["results"] for s in files["0.19.0"].values())


def test_0_22_0_recognised_by_content(tmp_path: Path) -> None:
    """A release that carries PR #38835, pinned by mistake as `backport`, is refused by its content."""
    data = tmp_path / "data"
    copy_data(data)
    pins = json.loads((data / "pins.json").read_text())
    pins["vllm"]["0.22.0"].update(plan="backport", overlay="fa4-sm90-hd512")
    (data / "pins.json").write_text(json.dumps(pins))
    r = run_cli("build", "--vllm", "0.22.0", "--out", str(tmp_path / "out"),
                "--base-wheel", str(real_wheel("0.22.0")), env={"VLLM_FORGE_DATA_DIR": str(data)})
    assert r.returncode == 2
    assert "already carries PR #38835" in r.stderr and "paged-KV refusal" in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("version", "mode", "select", "expect"), [
    ("0.18.1", "bundled", None, r"^9 passed, \d+ skipped"),
    ("0.19.1", "both", None, r"^14 passed"),
    ("0.19.1", "system", "system_fa4", r"^5 passed, \d+ deselected"),
])
def test_behaviour_of_other_wheels(version: str, mode: str, select: str | None, expect: str) -> None:
    """The behaviour tests, in a fresh interpreter, on the wheel of another release or build option."""
    real_wheel(version)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        str(REPO / "tests" / "test_behaviour.py"), "--forge-vllm", version, "--forge-fa4", mode,
                        *(["-k", select] if select else [])],
                       capture_output=True, text=True, cwd=REPO, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:]
    assert re.search(expect, r.stdout, re.M), r.stdout[-500:]


@pytest.fixture
def data_copy(tmp_path: Path) -> Path:
    return copy_data(tmp_path / "data", "vllm_overlay")


def test_refresh_0_19_1_to_0_18_1_reproduces_committed_overlay(data_copy: Path) -> None:
    manifest = json.loads((data_copy / "vllm_overlay" / "manifest.json").read_text())
    del manifest["overlays"]["fa4-sm90-hd512@0.18.1"]
    for sha, base in list(manifest["bases"].items()):
        base["results"].pop("fa4-sm90-hd512@0.18.1", None)
        if not base["results"]:
            del manifest["bases"][sha]
        elif "0.18.1" in base["seen_in"]:
            base["seen_in"].remove("0.18.1")
    (data_copy / "vllm_overlay" / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(data_copy / "vllm_overlay" / "fa4-sm90-hd512@0.18.1")

    real_wheel("0.18.1")
    report = refresh("0.19.1", "0.18.1", data_copy)
    assert sorted(report.merged) == ["vllm/v1/attention/backends/fa_utils.py",
                                     "vllm/v1/attention/backends/flash_attn.py"]
    assert report.reused == ["vllm/vllm_flash_attn/flash_attn_interface.py"]
    for name in ("fa_utils.py.patch", "flash_attn.py.patch"):
        rel = Path("vllm_overlay") / "fa4-sm90-hd512@0.18.1" / name
        assert (data_copy / rel).read_text() == (REPO / rel).read_text()
    assert json.loads((data_copy / "vllm_overlay" / "manifest.json").read_text()) == \
        json.loads((REPO / "vllm_overlay" / "manifest.json").read_text())
    assert json.loads((data_copy / "pins.json").read_text())["vllm"]["0.18.1"]["overlay"] == "fa4-sm90-hd512@0.18.1"


def test_refresh_to_0_22_0(data_copy: Path) -> None:
    real_wheel("0.22.0")
    before = {p: p.read_bytes() for p in data_copy.rglob("*") if p.is_file()}
    with pytest.raises(ForgeError, match="0.22.0 already carries PR #38835"):
        refresh("0.19.1", "0.22.0", data_copy)
    with pytest.raises(ForgeError, match=r"refresh conflict in vllm/v1/attention/backends/fa_utils.py: \d+ hunk"):
        refresh("0.19.1", "0.22.0", data_copy, force=True)
    assert {p: p.read_bytes() for p in data_copy.rglob("*") if p.is_file()} == before
