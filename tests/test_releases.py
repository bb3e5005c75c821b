"""Every release 0.17.0-0.33.0: plans from data, `tune` builds on the releases' own FA pins, the
flash-attention series ported per pin (refresh --fa-series), and its GPU-validation gate."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest
from conftest import copy_data, drop_series, real_wheel, run_cli

from vllm_forge.build import build
from vllm_forge.errors import ForgeError
from vllm_forge.fa4 import WHEEL_CUTE, fa_target, tree_sha256, zip_tree
from vllm_forge.pins import data_dir, load_pins
from vllm_forge.refresh_fa import refresh_fa_series
from vllm_forge.runtime import MODULE as RUNTIME_MODULE
from vllm_forge.runtime import runtime_source
from vllm_forge.series import read_manifest, series_for
from vllm_forge.verify import STAMP, verify_wheel

RELEASES = ["0.17.0", "0.17.1", "0.18.0", "0.18.1", "0.19.0", "0.19.1", "0.20.0", "0.20.1", "0.20.2", "0.21.0",
            "0.22.0", "0.22.1", "0.23.0", "0.24.0", "0.25.0", "0.25.1", "0.26.0", "0.27.0", "0.27.1", "0.28.0",
            "0.29.0", "0.30.0", "0.31.0", "0.32.0", "0.33.0"]


def test_every_release_is_pinned_with_a_plan() -> None:
    pins = load_pins()
    assert sorted(pins.vllm, key=lambda v: tuple(map(int, v.split(".")))) == RELEASES
    for v, vp in pins.vllm.items():
        # PR #38835 is in 0.20.0 and later: those are tuned on their own pin, the older ones backported
        assert vp.plan == ("tune" if tuple(map(int, v.split("."))) >= (0, 20, 0) else "backport"), v
        assert len(vp.wheel_sha256) == 64 and len(vp.sdist_sha256) == 64 and len(vp.cute_tree_sha256) == 64
        assert vp.wheel.startswith(f"vllm-{v}-") and vp.wheel.endswith("_x86_64.whl") and vp.wheel_choice
    # build tags: the upload pip installs (the highest build number) is the one pinned
    for v, tag in (("0.20.1", "-1-"), ("0.21.0", "-1-"), ("0.23.0", "-2-")):
        assert f"vllm-{v}{tag}cp38" in pins.vllm[v].wheel


def test_series_manifest_keys_are_the_pins_trees() -> None:
    """Each series is keyed by its pin's cute tree hash; every tune release has one."""
    pins = load_pins()
    manifest = read_manifest()["series"]
    tune_trees = {vp.cute_tree_sha256 for vp in pins.vllm.values() if vp.plan == "tune"}
    assert tune_trees <= set(manifest) | {pins.fa.cute_tree_sha256}
    for tree, entry in manifest.items():
        assert (data_dir() / "patches" / "flash-attention" / entry["dir"] / "series").is_file()
        commits = {vp.flash_attention_commit for vp in pins.vllm.values() if vp.cute_tree_sha256 == tree}
        assert entry["commit"] in commits | {pins.fa.commit}


@pytest.mark.parametrize("version", ["0.22.1", "0.25.1"])
def test_tune_build_keeps_the_release_and_its_requirements(version: str, tmp_path: Path) -> None:
    """Two tune releases on different FA pins: only cute/ changes (the release's own pin + its
    series), the runtime layer is added and, where the release forces TRITON_ATTN for Gemma-4
    (0.22.1, not 0.25.1), config.py gets the gemma4-fa4 layer; Requires-Dist stays the release's."""
    base = real_wheel(version)
    pins = load_pins()
    vp = pins.vllm[version]
    series = series_for(vp.cute_tree_sha256)
    assert series is not None and not series.validated(), "the shipped series of this pin is GPU-validated"
    result = build(version, tmp_path)
    gemma4 = version == "0.22.1"
    assert result.wheel.name.startswith(f"vllm-{version}+fa4.{vp.fa_short}.p{series.hash}{'.gemma4' * gemma4}-")
    verify_wheel(result.wheel, deep=True)
    with zipfile.ZipFile(base) as zb, zipfile.ZipFile(result.wheel) as zf:
        bdi = next(n.split("/")[0] for n in zb.namelist() if n.endswith(".dist-info/METADATA"))
        fdi = next(n.split("/")[0] for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        reqs = [sorted(ln for ln in z.read(f"{d}/METADATA").decode().splitlines() if ln.startswith("Requires-Dist"))
                for z, d in ((zb, bdi), (zf, fdi))]
        assert reqs[0] == reqs[1]
        assert tree_sha256(zip_tree(zb, WHEEL_CUTE)) == vp.cute_tree_sha256
        stamp = json.loads(zf.read(f"{fdi}/{STAMP}"))
        assert stamp["plan"] == "tune" and stamp["flash_attention"]["commit"] == vp.flash_attention_commit
        assert tree_sha256(zip_tree(zf, WHEEL_CUTE)) == stamp["flash_attention"]["tree_sha256"] != vp.cute_tree_sha256
        changed = {n for n in zf.namelist() if not n.startswith((WHEEL_CUTE, fdi))
                   and (n not in zb.namelist() or zf.read(n) != zb.read(n))}
        # outside FA4 and dist-info, only the runtime layer is added (byte for byte ours), and the Gemma-4 layer
        assert changed == {RUNTIME_MODULE} | ({"vllm/model_executor/models/config.py"} if gemma4 else set())
        assert zf.read(RUNTIME_MODULE) == runtime_source()


def test_newest_release(tmp_path: Path) -> None:
    """0.33.0 (FA b273a026, hand-ported series): forged and verified when its series is validated,
    else refused by default naming the reason, and forged with --allow-unvalidated."""
    real_wheel("0.33.0")
    vp = load_pins().vllm["0.33.0"]
    series = series_for(vp.cute_tree_sha256)
    assert series is not None
    if series.validated():
        r = run_cli("build", "--vllm", "0.33.0", "--out", str(tmp_path / "refused"))
        assert r.returncode == 2 and "is not GPU-validated" in r.stderr and "--allow-unvalidated" in r.stderr
        assert not (tmp_path / "refused").exists()
    result = build("0.33.0", tmp_path / "out", allow_unvalidated=True)
    verify_wheel(result.wheel, deep=True)


def test_unvalidated_series_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    copy_data(data)
    manifest = json.loads((data / "patches/flash-attention/manifest.json").read_text())
    tree = load_pins().vllm["0.22.1"].cute_tree_sha256
    manifest["series"][tree]["validation"] = None
    (data / "patches/flash-attention/manifest.json").write_text(json.dumps(manifest))
    real_wheel("0.22.1")
    env = {"VLLM_FORGE_DATA_DIR": str(data)}
    r = run_cli("build", "--vllm", "0.22.1", "--out", str(tmp_path / "out"), env=env)
    assert r.returncode == 2, r.stderr
    assert ("vllm-forge: error: the flash-attention series bce2942 for vLLM 0.22.1's FA pin bce2942 is not "
            "GPU-validated: it has no GPU validation record; no passed `vllm-forge validate` record for it on "
            "sm90 in ") in r.stderr and "-- run `vllm-forge validate`" in r.stderr
    assert not (tmp_path / "out").exists()
    # a validation of another revision of the series does not count either
    manifest["series"][tree]["validation"] = {"passed": True, "series": "0000000"}
    (data / "patches/flash-attention/manifest.json").write_text(json.dumps(manifest))
    r = run_cli("build", "--vllm", "0.22.1", "--out", str(tmp_path / "out"), env=env)
    assert r.returncode == 2 and "its GPU validation was of series 0000000" in r.stderr
    r = run_cli("build", "--vllm", "0.22.1", "--out", str(tmp_path / "out"), "--allow-unvalidated", env=env)
    assert r.returncode == 0, r.stderr
    assert "warning: shipping series bce2942 unvalidated" in r.stderr


def test_another_series_never_gets_the_default_name(tmp_path: Path) -> None:
    real_wheel("0.22.1")
    custom = tmp_path / "series"
    shutil.copytree(data_dir() / "patches" / "flash-attention" / "bce2942", custom)
    (custom / "series").write_text("0001-sm90-hd512-pv-rs.patch\n")  # 0001 alone
    default = build("0.22.1", tmp_path / "a")
    other = build("0.22.1", tmp_path / "b", fa_patch_dir=custom)
    none = tmp_path / "none"
    none.mkdir()
    pin_only = build("0.22.1", tmp_path / "c", fa_patch_dir=none)
    names = {default.wheel.name, other.wheel.name, pin_only.wheel.name}
    assert len(names) == 3, names
    assert pin_only.wheel.name.startswith("vllm-0.22.1+fa4.bce2942.gemma4-")
    verify_wheel(other.wheel, fa_patch_dir=custom)


def test_backport_layers_refused_for_tune(tmp_path: Path) -> None:
    r = run_cli("build", "--vllm", "0.25.1", "--fa4", "system", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "is a backport layer" in r.stderr


@pytest.fixture
def data_copy(tmp_path: Path) -> Path:
    return copy_data(tmp_path / "data", "patches")


def test_refresh_fa_series_reproduces_committed_port(data_copy: Path) -> None:
    """The committed series of 2c839c3 (vLLM 0.25.x) is exactly what the three-way merge makes."""
    drop_series(data_copy, "2c839c3")
    port = refresh_fa_series("0.22.0", "0.25.0", data_copy)
    assert port.patches == ["0001-sm90-hd512-pv-rs.patch", "0002-sm90-hd512-split-qk-head-dim.patch"]
    repo = data_dir() / "patches" / "flash-attention" / "2c839c3"
    for name in ["series", *port.patches]:
        assert (port.dir / name).read_text() == (repo / name).read_text(), name
    entry = read_manifest(data_copy / "patches" / "flash-attention")["series"][load_pins().vllm["0.25.0"].cute_tree_sha256]
    assert entry["dir"] == "2c839c3" and entry["validation"] is None
    assert entry["ported_from"]["dir"] == "bce2942" and entry["ported_from"]["series"] == "952cdd5"


def test_refresh_fa_series_conflict_writes_nothing(data_copy: Path, tmp_path: Path) -> None:
    """b273a026 (vLLM 0.33.0) moved code under our hunks: the report names patch, file and hunks."""
    drop_series(data_copy, "b273a02")
    before = {p: p.read_bytes() for p in data_copy.rglob("*") if p.is_file()}
    with pytest.raises(ForgeError, match=r"0002-sm90-hd512-split-qk-head-dim.patch: flash_attn/cute/"
                                         r"flash_fwd_sm90.py \d+ hunk\(s\) at merged lines"):
        refresh_fa_series("0.22.0", "0.33.0", data_copy, conflicts_dir=tmp_path / "conflicts")
    assert {p: p.read_bytes() for p in data_copy.rglob("*") if p.is_file()} == before
    marked = (tmp_path / "conflicts" / "0002-sm90-hd512-split-qk-head-dim.patch" / "flash_fwd_sm90.py").read_text()
    assert "<<<<<<< new" in marked and ">>>>>>> vllm-forge" in marked


def test_refresh_fa_series_refuses_existing_and_unknown(data_copy: Path) -> None:
    with pytest.raises(ForgeError, match="already has series 2c839c3"):
        refresh_fa_series("0.22.0", "0.25.1", data_copy)
    assert fa_target(load_pins(), load_pins().vllm["0.19.1"]).short == "bce2942"  # backport: the backport pin
    drop_series(data_copy, "bce2942")
    with pytest.raises(ForgeError, match="has no series to port"):
        refresh_fa_series("0.22.0", "0.25.1", data_copy)


def test_kernel_records_are_what_the_gpu_logs_say(tmp_path: Path) -> None:
    """Each series' `validation.kernel` (the head-512 timing and the releases issue's goals) is exactly
    what scripts/series_records.py's `kernel` makes of the committed GPU output: no number in the manifest
    that the logs do not carry."""
    import importlib.util

    from vllm_forge.series import read_manifest, series_root

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("series_records", root / "scripts" / "series_records.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    shipped = read_manifest()
    recorded = {k: v["validation"]["kernel"] for k, v in shipped["series"].items() if "kernel" in v.get("validation", {})}
    assert len(recorded) == 10
    work = tmp_path / "fa"
    shutil.copytree(series_root(), work)
    stripped = json.loads((work / "manifest.json").read_text())
    for entry in stripped["series"].values():
        entry["validation"].pop("kernel", None)
    (work / "manifest.json").write_text(json.dumps(stripped))
    data = max((root / "docs" / "data").glob("hd512-*"))
    mod.record(data, work)
    again = {k: v["validation"]["kernel"] for k, v in read_manifest(work)["series"].items() if "kernel" in v["validation"]}
    assert again == recorded
    assert all(r["goal"].startswith("ok") and r["goal_heads_256_128"].startswith("ok") for r in again.values())
