"""FA4 sources: the mirrors, the CMake FA4 component, the tree hash, the patch series."""

from __future__ import annotations

import difflib
import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import git
import pytest
from conftest import index, run_cli

from vllm_forge.build import build
from vllm_forge.fa4 import (
    CUTE,
    WHEEL_CUTE,
    cmake_install_fa4,
    from_git,
    from_wheel,
    read_tree,
    tree_sha256,
)
from vllm_forge.pins import Pins
from vllm_forge.verify import verify_wheel


def test_cmake_component_rewrites_like_vllm(fa_upstream: Path, tmp_path: Path, pins: Pins) -> None:
    upstream = read_tree(fa_upstream / CUTE, "test")
    out = cmake_install_fa4(fa_upstream, tmp_path)
    assert sorted(out) == sorted(upstream)
    for rel, data in upstream.items():
        assert out[rel] == data.replace(b"flash_attn.cute", b"vllm.vllm_flash_attn.cute"), rel
    assert tree_sha256(out) == pins.fa.cute_tree_sha256


def test_cmake_honours_vllm_flash_attn_src_dir_env(fa_upstream: Path, tmp_path: Path, monkeypatch) -> None:
    """Like vLLM's CMake, the environment variable wins over the -D value."""
    monkeypatch.setenv("VLLM_FLASH_ATTN_SRC_DIR", str(tmp_path / "nowhere"))
    out = cmake_install_fa4(fa_upstream, tmp_path)  # passes the source through the environment
    assert "interface.py" in out


def test_wheel_mirror_reads_only_cute_members(tmp_path: Path, pins: Pins, monkeypatch) -> None:
    monkeypatch.setenv("VLLM_FORGE_CACHE", str(tmp_path / "cache"))  # no cached 0.22.0 wheel
    tree, mirror = from_wheel(pins.fa, index, pins.index_project)
    assert "range requests" in mirror
    fetched_mb = float(mirror.split(", ")[1].split(" MB")[0])
    assert fetched_mb < 5, mirror  # of a 261 MB wheel
    assert len(tree) == pins.fa.cute_file_count
    assert all(b"vllm.vllm_flash_attn.cute" not in d for d in tree.values())


def test_git_mirror_mechanics(fa_upstream: Path, tmp_path: Path, pins: Pins, monkeypatch) -> None:
    """A local repository with the real pinned FA4 files: fetched by commit, then tree-hash checked."""
    monkeypatch.setenv("VLLM_FORGE_CACHE", str(tmp_path / "cache"))
    work = tmp_path / "repo"
    repo = git.Repo.init(work)
    (work / CUTE).mkdir(parents=True)
    for rel, data in read_tree(fa_upstream / CUTE, "test").items():
        (work / CUTE / rel).write_bytes(data)
    (work / "README.md").write_text("flash-attention stand-in repository\n")
    repo.index.add([CUTE, "README.md"])
    commit = repo.index.commit("pinned FA4 sources").hexsha
    (work / CUTE / "interface.py").write_text("# a later commit\n")
    repo.index.add([f"{CUTE}/interface.py"])
    repo.index.commit("later")

    tree = from_git(f"file://{work}", commit)
    assert tree["interface.py"] == (fa_upstream / CUTE / "interface.py").read_bytes()
    out_dir = tmp_path / "staging"
    (out_dir / CUTE).mkdir(parents=True)
    for rel, data in tree.items():
        (out_dir / CUTE / rel).write_bytes(data)
    assert tree_sha256(cmake_install_fa4(out_dir, tmp_path / "w")) == pins.fa.cute_tree_sha256
    # a second call is served from the cached bare repository: the origin may be gone
    shutil.rmtree(work)
    assert from_git(f"file://{work}", commit) == tree


def _real_patch(fa_upstream: Path) -> str:
    """A real patch on the pinned interface.py: raise the SM90 forward's head-dim error text."""
    rel = f"{CUTE}/interface.py"
    old = (fa_upstream / rel).read_text().splitlines(keepends=True)
    new = [ln.replace("must be between 8 and 256", "must be between 8 and 512") for ln in old]
    assert new != old
    return "".join(difflib.unified_diff(old, new, f"a/{rel}", f"b/{rel}"))


def test_real_patch_applied_recorded_and_verified(fa_upstream: Path, tmp_path: Path, base_wheel: Path) -> None:
    patches = tmp_path / "patches"
    patches.mkdir()
    text = _real_patch(fa_upstream)
    (patches / "0001-sm90-hdim-message.patch").write_text(text)
    (patches / "series").write_text("# applied in order\n0001-sm90-hdim-message.patch\n")
    result = build("0.19.1", tmp_path / "out", fa_patch_dir=patches)
    with zipfile.ZipFile(result.wheel) as zf:
        iface = zf.read(f"{WHEEL_CUTE}/interface.py").decode()
    assert "must be between 8 and 512" in iface and "must be between 8 and 256" not in iface
    assert "from vllm.vllm_flash_attn.cute" in iface  # rewritten after patching
    m = json.loads(result.manifest.read_text())
    assert m["flash_attention"]["patches"] == [
        {"name": "0001-sm90-hdim-message.patch", "sha256": hashlib.sha256(text.encode()).hexdigest()}]
    assert m["flash_attention"]["tree_sha256"] != m["flash_attention"]["pin_tree_sha256"]
    verify_wheel(result.wheel, deep=False, fa_patch_dir=patches)
    r = run_cli("verify", "--quick", str(result.wheel))  # the default (empty) series does not match
    assert r.returncode == 2 and "differ from the series" in r.stderr
    r = run_cli("verify", "--fa-patches", str(patches), str(result.wheel))  # rebuilt with that series
    assert r.returncode == 0 and "bit for bit identical to a rebuild" in r.stdout, r.stderr


def test_series_lists_missing_patch(tmp_path: Path, fa_upstream: Path) -> None:
    from vllm_forge.errors import ForgeError
    from vllm_forge.patching import read_series

    (tmp_path / "series").write_text("0001-absent.patch\n")
    with pytest.raises(ForgeError, match="lists 0001-absent.patch, which does not exist"):
        read_series(tmp_path)
