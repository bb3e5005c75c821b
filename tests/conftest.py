"""Shared fixtures: real vLLM artifacts from the package index (cached under ~/.cache/vllm-forge)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import pytest

from vllm_forge.build import BuildResult, build
from vllm_forge.fa4 import CUTE, get_fa4_sources
from vllm_forge.fetch import Index, cached_download
from vllm_forge.pins import Pins, load_pins

index = cache(lambda: Index())


@pytest.fixture(autouse=True)
def _own_user_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No test reads or writes the validation records of the machine's user (build's gate reads them)."""
    monkeypatch.setenv("VLLM_FORGE_USER_DATA_DIR", str(tmp_path_factory.mktemp("user-data")))


@contextmanager
def scratch(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[Path]:
    """A directory for a module-scoped fixture's forged wheel, removed when the fixture ends (the
    session's temporary directory would otherwise hold every ~400 MB wheel until pytest exits)."""
    path = tmp_path_factory.mktemp(name)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def pins() -> Pins:
    return load_pins()


def real_wheel(version: str) -> Path:
    """The real upstream wheel of a pinned (or mirror) vLLM version, sha256-checked."""
    p = load_pins()
    return cached_download(index, p.index_project, p.vllm[version].wheel, p.vllm[version].wheel_sha256)


@pytest.fixture(scope="session")
def base_wheel() -> Path:
    return real_wheel("0.19.1")


@pytest.fixture(scope="session")
def fa_upstream(tmp_path_factory: pytest.TempPathFactory, pins: Pins) -> Path:
    """A flash-attention source tree (flash_attn/cute/*.py, upstream imports) of the pin,
    obtained through the tool's own mirror chain and tree-hash verified."""
    work = tmp_path_factory.mktemp("fa-upstream")
    no_patches = tmp_path_factory.mktemp("no-fa-patches")  # the pin itself, not our patched tree
    get_fa4_sources(pins.fa, work, index, pins.index_project, patch_dir=no_patches)
    root = work / "fa-src"
    assert (root / CUTE / "interface.py").is_file()
    return root


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `image` build the container image for real (~25 min, GBs): deselected unless
    VLLM_FORGE_IMAGE_TEST=1."""
    if os.environ.get("VLLM_FORGE_IMAGE_TEST") == "1":
        return
    image = [item for item in items if item.get_closest_marker("image")]
    if image:
        config.hook.pytest_deselected(items=image)
        items[:] = [item for item in items if not item.get_closest_marker("image")]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--forge-vllm", default="0.19.1", help="vLLM release the behaviour tests forge and import")
    parser.addoption("--forge-fa4", default="bundled", help="--fa4 mode of the wheel the behaviour tests import")


@pytest.fixture(scope="session")
def forged(tmp_path_factory: pytest.TempPathFactory, base_wheel: Path) -> BuildResult:
    return build("0.19.1", tmp_path_factory.mktemp("forged"))


@pytest.fixture(scope="session")
def forged_for_behaviour(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> BuildResult:
    version, mode = request.config.getoption("--forge-vllm"), request.config.getoption("--forge-fa4")
    if (version, mode) == ("0.19.1", "bundled"):
        return request.getfixturevalue("forged")  # type: ignore[no-any-return]
    real_wheel(version)
    return build(version, tmp_path_factory.mktemp(f"forged-{version}-{mode}"), fa4_mode=mode)


DATA_ITEMS = ("CMakeLists.txt", "pins.json", "cmake", "patches", "vllm_overlay", "docker")  # as installed


def copy_data(dest: Path, *items: str) -> Path:
    """A writable copy of the tool's data (what VLLM_FORGE_DATA_DIR may point at): all of it, or
    pins.json and the named parts."""
    from vllm_forge.pins import data_dir

    dest.mkdir(parents=True, exist_ok=True)
    for item in ("pins.json", *items) if items else DATA_ITEMS:
        src = data_dir() / item
        if src.is_dir():
            shutil.copytree(src, dest / item)
        else:
            shutil.copy(src, dest / item)
    return dest


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vllm_forge.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def default_fa_series() -> list[tuple[str, str, set[str]]]:
    """The shipped patches/flash-attention series: (name, sha256, cute files it touches)."""
    import hashlib

    from vllm_forge.patching import read_series
    from vllm_forge.pins import data_dir

    out = []
    for patch in read_series(data_dir() / "patches" / "flash-attention" / "bce2942"):
        text = patch.read_text()
        touched = {ln.split("flash_attn/cute/", 1)[1] for ln in text.splitlines() if ln.startswith("+++ b/")}
        out.append((patch.name, hashlib.sha256(patch.read_bytes()).hexdigest(), touched))
    return out


# A script run in a fresh interpreter on a release's real vLLM package (its .py files unpacked into
# sys.argv[1]) on the faked device of fake_gpu.py: FakeGpu and DeviceCapability are defined for it.
FAKE_GPU_PRELUDE = f"""
import sys, types
sys.path.insert(0, sys.argv[1])
sys.path.insert(1, {str(Path(__file__).resolve().parent)!r})
from fake_gpu import install
FakeGpu, DeviceCapability = install()
"""


def run_on_release(wheel: Path, tmp_path: Path, script: str, *args: str) -> list[str]:
    """FAKE_GPU_PRELUDE + script on the .py files of `wheel` (stock or forged): its stdout lines."""
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(tmp_path, [n for n in zf.namelist() if n.startswith("vllm/") and n.endswith(".py")])
    probe = tmp_path / "probe.py"
    probe.write_text(FAKE_GPU_PRELUDE + script)
    run = subprocess.run([sys.executable, str(probe), str(tmp_path), *args], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout.strip().splitlines()


def drop_series(data: Path, pin7: str) -> None:
    """Remove the flash-attention series of FA pin `pin7` from a data copy (its directory and manifest entry)."""
    path = data / "patches" / "flash-attention" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["series"] = {k: v for k, v in manifest["series"].items() if v["dir"] != pin7}
    path.write_text(json.dumps(manifest))
    shutil.rmtree(data / "patches" / "flash-attention" / pin7)
