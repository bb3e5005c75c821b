"""Every bad input ends in one clear line on stderr naming the thing, exit 2, nothing left in --out."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest
from conftest import copy_data, real_wheel, run_cli

from vllm_forge.errors import ForgeError
from vllm_forge.fa4 import CUTE
from vllm_forge.overlay import load_overlay


def refused(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> str:
    out = tmp_path / "out"
    r = run_cli("build", "--out", str(out), *args, env=env)
    assert r.returncode == 2, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("vllm-forge: error:")]
    assert len(errors) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())
    return errors[0]


def test_truncated_base_wheel(tmp_path: Path, base_wheel: Path) -> None:
    bad = tmp_path / base_wheel.name
    with open(base_wheel, "rb") as src, open(bad, "wb") as dst:
        dst.write(src.read(50_000_000))
    assert "is corrupt or truncated" in refused(tmp_path, "--base-wheel", str(bad))


def test_corrupt_base_wheel(tmp_path: Path, base_wheel: Path) -> None:
    bad = tmp_path / base_wheel.name
    shutil.copyfile(base_wheel, bad)
    with open(bad, "r+b") as f:  # flip bytes inside a member's compressed data
        f.seek(200_000_000)
        f.write(b"\x00" * 64)
    err = refused(tmp_path, "--base-wheel", str(bad))
    assert "sha256 mismatch for base wheel" in err and bad.name in err


def test_wrong_version(tmp_path: Path) -> None:
    err = refused(tmp_path, "--vllm", "0.19.1", "--base-wheel", str(real_wheel("0.22.0")))
    assert "is vLLM 0.22.0, not 0.19.1" in err


def test_unknown_version(tmp_path: Path) -> None:
    assert "unknown vLLM version '0.99.0'" in refused(tmp_path, "--vllm", "0.99.0")


def test_drifted_base_file_real_release(tmp_path: Path) -> None:
    """vLLM 0.18.1's flash_attn.py differs from 0.19.x: the 0.19 overlay must refuse it."""
    data = tmp_path / "data"
    copy_data(data)
    pins = json.loads((data / "pins.json").read_text())
    pins["vllm"]["0.18.1"] = {**pins["vllm"]["0.19.1"],
                              "wheel": "vllm-0.18.1-cp38-abi3-manylinux_2_31_x86_64.whl",
                              "wheel_sha256": "33d6d81299dedd45dde43fef261fbad2d513ed80e7cf7e64fb5880e8cf8ea105"}
    (data / "pins.json").write_text(json.dumps(pins))
    err = refused(tmp_path, "--vllm", "0.18.1", "--base-wheel", str(real_wheel("0.18.1")),
                  env={"VLLM_FORGE_DATA_DIR": str(data)})
    assert "drifted base file vllm/v1/attention/backends/" in err


def test_drifted_base_file_in_overlay(base_wheel: Path) -> None:
    overlay = load_overlay("fa4-sm90-hd512")
    with zipfile.ZipFile(base_wheel) as zf:
        files = {p: zf.read(p) for p in overlay.paths}
    files["vllm/v1/attention/backends/fa_utils.py"] += b"\n# local edit\n"
    with pytest.raises(ForgeError, match="drifted base file vllm/v1/attention/backends/fa_utils.py"):
        overlay.apply(files)


def test_fa_tree_hash_mismatch(tmp_path: Path, fa_upstream: Path) -> None:
    src = tmp_path / "fa"
    shutil.copytree(fa_upstream, src)
    with open(src / CUTE / "softmax.py", "a") as f:
        f.write("# not the pinned commit\n")
    err = refused(tmp_path, "--fa-src", str(src))
    assert "flash-attention tree-hash mismatch from local" in err


def test_patch_conflict(tmp_path: Path, fa_upstream: Path) -> None:
    patches = tmp_path / "patches"
    patches.mkdir()
    (patches / "0001-conflict.patch").write_text(
        "--- a/flash_attn/cute/interface.py\n+++ b/flash_attn/cute/interface.py\n"
        "@@ -1,3 +1,3 @@\n-this line is not in interface.py\n+replacement\n context\n context2\n")
    (patches / "series").write_text("0001-conflict.patch\n")
    err = refused(tmp_path, "--fa-src", str(fa_upstream), "--fa-patches", str(patches))
    assert "patch 0001-conflict.patch does not apply to flash_attn/cute/interface.py" in err


def test_unsafe_member_name(tmp_path: Path, base_wheel: Path) -> None:
    bad = tmp_path / base_wheel.name
    shutil.copyfile(base_wheel, bad)
    with zipfile.ZipFile(bad, "a") as zf:
        zf.writestr("../../etc/evil.py", b"print('escaped')\n")
    err = refused(tmp_path, "--base-wheel", str(bad))
    assert "unsafe archive member name '../../etc/evil.py'" in err


def test_no_network_nothing_cached(tmp_path: Path) -> None:
    env = {"VLLM_FORGE_CACHE": str(tmp_path / "empty-cache"), "VLLM_FLASH_ATTN_SRC_DIR": ""}
    err = refused(tmp_path, "--index-url", "http://127.0.0.1:9/simple/", env=env)
    assert "cannot reach the package index at http://127.0.0.1:9/simple/vllm/" in err


def test_no_network_no_fa_source(tmp_path: Path, base_wheel: Path) -> None:
    env = {"VLLM_FORGE_CACHE": str(tmp_path / "empty-cache"), "VLLM_FLASH_ATTN_SRC_DIR": "",
           "GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "url.http://127.0.0.1:9/.insteadOf",
           "GIT_CONFIG_VALUE_0": "https://github.com/"}
    err = refused(tmp_path, "--base-wheel", str(base_wheel), "--index-url", "http://127.0.0.1:9/simple/", env=env)
    assert "no mirror delivered flash-attention@bce29425653e" in err
    assert "git:" in err and "wheel:" in err and "cache:" in err


def test_missing_commit_in_git_mirror(tmp_path: Path) -> None:
    import git

    repo = git.Repo.init(tmp_path / "fa.git")
    (tmp_path / "fa.git" / "README").write_text("not the pinned commit\n")
    repo.index.add(["README"])
    repo.index.commit("unrelated")
    err = refused(tmp_path, "--fa-src", f"file://{tmp_path / 'fa.git'}",
                  env={"VLLM_FORGE_CACHE": str(tmp_path / "cache")})
    assert "commit bce29425653ec0fbc579d329883030e832d15ada not found in git mirror file://" in err
