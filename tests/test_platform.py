"""--platform aarch64 (GH200: the release's aarch64 wheel, the same plans) and `vllm-forge pin X`
(a release resolved from the index into the user data directory), with the real release files."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
from packaging.utils import parse_wheel_filename

from conftest import copy_data, drop_series, run_cli
from test_hostile import one_error
from vllm_forge.pins import data_dir, load_pins
from vllm_forge.verify import STAMP


def test_every_release_pins_its_aarch64_wheel() -> None:
    """pins.json (scripts/pin_releases.py --write): every release's aarch64 wheel, whose every .py file
    has the x86_64 wheel's sha256 (their RECORDs), so the plan applies unchanged."""
    raw = json.loads((data_dir() / "pins.json").read_text())
    pins = load_pins()
    for version, entry in raw["vllm"].items():
        arm = entry["platforms"]["aarch64"]
        _, ver, _, tags = parse_wheel_filename(arm["wheel"])
        assert str(ver) == version and all(t.platform.endswith("_aarch64") and t.abi == "abi3" for t in tags)
        assert arm["python_differs"] == [] and arm["python_files"] > 1000, version
        vp = pins.for_version(version, platform="aarch64")
        x86 = pins.for_version(version)
        assert (vp.wheel, vp.wheel_sha256, vp.platform) == (arm["wheel"], arm["wheel_sha256"], "aarch64")
        assert (vp.plan, vp.overlay, vp.cute_tree_sha256) == (x86.plan, x86.overlay, x86.cute_tree_sha256)
    # pip's choice where a release has two aarch64 uploads: the build-tagged one
    arm = raw["vllm"]["0.20.1"]["platforms"]["aarch64"]
    assert arm["wheel"] == "vllm-0.20.1-1-cp38-abi3-manylinux_2_35_aarch64.whl"


def test_aarch64_refused_where_its_python_differs(tmp_path: Path) -> None:
    data = copy_data(tmp_path / "data")
    raw = json.loads((data / "pins.json").read_text())
    raw["vllm"]["0.22.1"]["platforms"]["aarch64"]["python_differs"] = ["vllm/v1/attention/backends/flash_attn.py"]
    (data / "pins.json").write_text(json.dumps(raw))
    r = run_cli("build", "--vllm", "0.22.1", "--platform", "aarch64", "--out", str(tmp_path / "out"),
                env={"VLLM_FORGE_DATA_DIR": str(data)})
    assert r.returncode == 2
    one_error(r, "vLLM 0.22.1 cannot be forged: 1 Python file(s) of its aarch64 wheel differ",
                   "flash_attn.py")
    assert not (tmp_path / "out").exists()


def test_docker_renders_the_aarch64_build(tmp_path: Path) -> None:
    r = run_cli("docker", "--vllm", "0.20.0", "--platform", "aarch64", "--out", str(tmp_path / "docker"))
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "docker" / "Dockerfile").read_text()
    assert "vllm-forge build --vllm 0.20.0 --platform aarch64 " in text
    assert "/wheels/vllm-0.20.0-cp38-abi3-manylinux_2_35_aarch64.whl" in text
    assert "_aarch64.whl" in text.split("vllm-forge lock /dist/", 1)[1].split()[0]


@pytest.mark.network
def test_aarch64_forge_and_verify(tmp_path: Path) -> None:
    """vLLM 0.20.0 (the smallest aarch64 wheel, 236 MB; its series is GPU-validated): forged from the real
    aarch64 wheel, the same overlay stack and FA4 series as x86_64, then rebuilt and compared by verify."""
    out = tmp_path / "out"
    r = run_cli("build", "--vllm", "0.20.0", "--platform", "aarch64", "--out", str(out))
    assert r.returncode == 0, r.stderr
    wheel = Path(r.stdout.strip())
    arm = load_pins().for_version("0.20.0", platform="aarch64")
    assert parse_wheel_filename(wheel.name)[3] == parse_wheel_filename(arm.wheel)[3]
    with zipfile.ZipFile(wheel) as zf:
        stamp = json.loads(zf.read(next(n for n in zf.namelist() if n.endswith(STAMP))))
    assert stamp["vllm"] == {"version": "0.20.0", "wheel": arm.wheel, "wheel_sha256": arm.wheel_sha256,
                             "platform": "aarch64"}
    assert stamp["overlay"]["layers"] == ["gemma4-fa4"] and stamp["flash_attention"]["patches"]
    r = run_cli("verify", "--platform", "aarch64", str(wheel))
    assert r.returncode == 0, r.stderr
    assert "identical to a rebuild from the pinned inputs" in r.stdout
    r = run_cli("verify", "--platform", "x86_64", "--quick", str(wheel))
    assert r.returncode == 2
    one_error(r, "built for --platform aarch64, not x86_64")
    r = run_cli("lock", "--platform", "x86_64", str(wheel), "--out", str(tmp_path / "lock.txt"))
    assert r.returncode == 2 and not (tmp_path / "lock.txt").exists()
    one_error(r, "is a aarch64 wheel, not x86_64")


@pytest.mark.network
def test_pin_a_shipped_release_gives_the_shipped_entry(tmp_path: Path) -> None:
    user = tmp_path / "user"
    r = run_cli("pin", "0.33.0", "--data-dir", str(user))
    assert r.returncode == 0, r.stderr
    got = json.loads((user / "pins.json").read_text())["vllm"]
    assert got == {"0.33.0": json.loads((data_dir() / "pins.json").read_text())["vllm"]["0.33.0"]}
    assert sorted(p.name for p in user.iterdir()) == ["pins.json"]  # its FA pin has the tool's series


@pytest.mark.network
def test_pin_ports_the_nearest_series_then_build_asks_for_validation(tmp_path: Path) -> None:
    """Without the tool's series for 2c839c3 (vLLM 0.25.x), `pin 0.25.1` ports 0.24.0's by three-way merge
    into the user data dir: exactly the committed series. `build` then refuses it as unvalidated."""
    data = copy_data(tmp_path / "data")
    drop_series(data, "2c839c3")
    user = tmp_path / "user"
    env = {"VLLM_FORGE_DATA_DIR": str(data), "VLLM_FORGE_USER_DATA_DIR": str(user)}
    r = run_cli("pin", "0.25.1", env=env)
    assert r.returncode == 0, r.stderr
    assert "ported from vLLM 0.24.0's" in r.stdout
    ported = user / "patches" / "flash-attention" / "2c839c3"
    shipped = data_dir() / "patches" / "flash-attention" / "2c839c3"
    assert sorted(p.name for p in ported.iterdir()) == sorted(p.name for p in shipped.iterdir())
    for p in shipped.iterdir():
        assert (ported / p.name).read_text() == p.read_text(), p.name
    entry = json.loads((ported.parent / "manifest.json").read_text())["series"]
    assert [e["ported_from"]["dir"] for e in entry.values()] == ["803020a"]
    assert all(e["validation"] is None for e in entry.values())
    r = run_cli("build", "--vllm", "0.25.1", "--out", str(tmp_path / "out"), env=env)
    assert r.returncode == 2 and not (tmp_path / "out").exists()
    one_error(r, "series 2c839c3", "is not GPU-validated", "run `vllm-forge validate`")


@pytest.mark.network
def test_pin_conflict_and_bad_input_write_nothing(tmp_path: Path) -> None:
    data = copy_data(tmp_path / "data")
    drop_series(data, "b273a02")
    user = tmp_path / "user"
    env = {"VLLM_FORGE_DATA_DIR": str(data), "VLLM_FORGE_USER_DATA_DIR": str(user)}
    r = run_cli("pin", "0.33.0", "--conflicts", str(tmp_path / "conflicts"), env=env)
    assert r.returncode == 2 and not user.exists()
    one_error(r, "refresh conflict porting series 506341a to flash-attention b273a02",
                   "0002-sm90-hd512-split-qk-head-dim.patch: flash_attn/cute/flash_fwd_sm90.py", "nothing was written")
    assert "<<<<<<<" in (tmp_path / "conflicts" / "0002-sm90-hd512-split-qk-head-dim.patch"
                         / "flash_fwd_sm90.py").read_text()
    for bad, what in (("0.99.0", "vLLM 0.99.0 has no x86_64"), ("../x", "is not a version"),
                      ("1.0rc1", "is not a vLLM release version")):
        r = run_cli("pin", bad, env=env)
        assert r.returncode == 2 and not user.exists(), bad
        one_error(r, what)


def test_malformed_user_pins_named(tmp_path: Path) -> None:
    user = tmp_path / "user"
    user.mkdir()
    env = {"VLLM_FORGE_USER_DATA_DIR": str(user)}
    entry = json.loads((data_dir() / "pins.json").read_text())["vllm"]["0.33.0"]
    (user / "pins.json").write_text(json.dumps({"schema": 1, "vllm": {"0.33.0": {**entry, "wheel": "../evil.whl"}}}))
    r = run_cli("build", "--vllm", "0.19.1", "--out", str(tmp_path / "out"), env=env)
    assert r.returncode == 2 and not (tmp_path / "out").exists()
    one_error(r, f"with the user pins {user / 'pins.json'}", "'../evil.whl' is not a file name",
                   f"or remove {user / 'pins.json'}")
    (user / "pins.json").write_text("{")
    r = run_cli("build", "--vllm", "0.19.1", "--out", str(tmp_path / "out"), env=env)
    assert r.returncode == 2 and not (tmp_path / "out").exists()
    one_error(r, "cannot read the user pins")


def test_lock_resolves_for_the_wheels_platform(monkeypatch: pytest.MonkeyPatch) -> None:
    """An aarch64 wheel locked on an x86_64 host: pip resolves binary wheels for its platform and every older
    glibc (older pips take --platform literally); on its own machine, no options."""
    from vllm_forge import lock

    name = Path("vllm-0.20.0+fa4.f5bc33c-cp38-abi3-manylinux_2_35_aarch64.whl")
    monkeypatch.setattr(lock.host, "machine", lambda: "x86_64")
    args = lock.platform_args(name, None)
    assert args[0] == "--only-binary=:all:" and "--platform=manylinux_2_35_aarch64" in args
    assert "--platform=manylinux_2_17_aarch64" in args and "--platform=manylinux2014_aarch64" in args
    assert not any("x86_64" in a for a in args)
    monkeypatch.setattr(lock.host, "machine", lambda: "aarch64")
    assert lock.platform_args(name, "aarch64") == []
    with pytest.raises(lock.ForgeError, match="is a aarch64 wheel, not x86_64"):
        lock.platform_args(name, "x86_64")
