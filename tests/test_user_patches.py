"""The user's own vLLM patches (`build --patches`, `verify`, `refresh --patches`, `export`), on the real
release files: a small change to vLLM 0.22.1's FlashAttention backend, exported from an edited tree,
forged and verified, then carried to 0.23.0 and 0.24.0 by three-way merge."""

from __future__ import annotations

import difflib
import json
import zipfile
from pathlib import Path

import pytest

from conftest import real_wheel, run_cli
from test_hostile import one_error
from vllm_forge.user_patches import apply_user_series, load_user_series, release_files
from vllm_forge.verify import STAMP

FILE = "vllm/v1/attention/backends/flash_attn.py"
ANCHOR = "        if current_platform.is_xpu():\n            return max(default_block_size, 64)\n"
EDIT = ("        if current_platform.is_device_capability(90):\n"
        "            # site patch: 64-token pages let FA4 load K/V by TMA on Hopper\n"
        "            return max(default_block_size, 64)\n")

pytestmark = pytest.mark.network


def edited_tree(root: Path, version: str, edit: tuple[str, str]) -> Path:
    text = release_files(version, [FILE])[FILE].decode()
    assert edit[0] in text
    (root / FILE).parent.mkdir(parents=True)
    (root / FILE).write_text(text.replace(edit[0], edit[1], 1))
    return root


def test_user_patch_forged_verified_and_carried_two_releases(tmp_path: Path) -> None:
    with zipfile.ZipFile(real_wheel("0.22.1")) as zf:
        assert ANCHOR in zf.read(FILE).decode()
    tree = edited_tree(tmp_path / "tree", "0.22.1", (ANCHOR, ANCHOR + EDIT))
    r = run_cli("export", "--vllm", "0.22.1", "--tree", str(tree), "--out", str(tmp_path / "p0221"))
    assert r.returncode == 0, r.stderr
    us = load_user_series(tmp_path / "p0221")
    assert us.files == (FILE,) and len(us.patches) == 1

    out = tmp_path / "out"
    r = run_cli("build", "--vllm", "0.22.1", "--patches", str(tmp_path / "p0221"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    wheel = Path(r.stdout.strip())
    assert f".u{us.hash}-" in wheel.name
    with zipfile.ZipFile(wheel) as zf:
        assert EDIT in zf.read(FILE).decode()
        stamp = json.loads(zf.read(next(n for n in zf.namelist() if n.endswith(STAMP))))
    assert stamp["user_patches"]["series"] == us.hash and list(stamp["user_patches"]["results"]) == [FILE]
    manifest = json.loads(next(out.glob("*.manifest.json")).read_text())
    assert manifest["user_patches"]["bases"] == us.bases
    r = run_cli("verify", str(wheel))  # the stamp's copy of the patches
    assert r.returncode == 0 and "identical to a rebuild" in r.stdout, r.stderr
    r = run_cli("verify", "--patches", str(tmp_path / "p0221"), str(wheel))
    assert r.returncode == 0 and "identical to a rebuild" in r.stdout, r.stderr

    # carried to the next two releases whose file differs (0.23.0, then 0.24.0): by range requests
    prev = tmp_path / "p0221"
    for a, b in (("0.22.1", "0.23.0"), ("0.23.0", "0.24.0")):
        r = run_cli("refresh", "--patches", str(prev), "--from", a, "--to", b, "--out", str(tmp_path / f"p{b}"))
        assert r.returncode == 0, r.stderr
        ported = load_user_series(tmp_path / f"p{b}")
        new = release_files(b, [FILE])
        assert ported.bases[FILE] != us.bases[FILE]  # another file: a real merge
        got = apply_user_series(ported, b, new, {}, tmp_path / f"apply{b}")[FILE].decode()
        assert got == new[FILE].decode().replace(ANCHOR, ANCHOR + EDIT, 1)
        prev = tmp_path / f"p{b}"

    # on a release whose file differs, unported: refused before anything is published
    real_wheel("0.25.1")
    r = run_cli("build", "--vllm", "0.25.1", "--patches", str(tmp_path / "p0221"), "--out", str(tmp_path / "o2"))
    assert r.returncode == 2 and not (tmp_path / "o2").exists()
    one_error(r, f"were made on {FILE} sha256 {us.bases[FILE][:12]}", "vllm-forge refresh --patches")


def test_user_patch_conflict_writes_nothing(tmp_path: Path) -> None:
    """An edit on a line that 0.24.0 changed: the port names patch, file and hunk, and writes nothing."""
    old, new = (release_files(v, [FILE])[FILE].decode().splitlines(keepends=True) for v in ("0.23.0", "0.24.0"))
    changed = next(line for tag, i1, i2, _, _ in difflib.SequenceMatcher(None, old, new).get_opcodes()
                   if tag == "replace" for line in old[i1:i2] if line.strip())
    tree = edited_tree(tmp_path / "tree", "0.23.0", (changed, changed.rstrip("\n") + "  # site patch\n"))
    assert run_cli("export", "--vllm", "0.23.0", "--tree", str(tree), "--out", str(tmp_path / "p")).returncode == 0
    r = run_cli("refresh", "--patches", str(tmp_path / "p"), "--from", "0.23.0", "--to", "0.24.0",
                "--out", str(tmp_path / "ported"), "--conflicts", str(tmp_path / "conflicts"))
    assert r.returncode == 2 and not (tmp_path / "ported").exists()
    one_error(r, "refresh conflict porting", f"0001-vllm-v1-attention-backends-flash-attn.patch: {FILE} "
                   "1 hunk(s) at merged lines", "nothing was written")
    assert "<<<<<<< new" in next((tmp_path / "conflicts").rglob("flash_attn.py")).read_text()
    same = edited_tree(tmp_path / "same", "0.23.0", ("", ""))  # the release's file, unedited
    for tree_arg, what in ((tmp_path / "nothing", "has no vllm/ directory"), (same, "no .py file under")):
        r = run_cli("export", "--vllm", "0.23.0", "--tree", str(tree_arg), "--out", str(tmp_path / "e"))
        assert r.returncode == 2 and not (tmp_path / "e").exists()
        one_error(r, what)
    r = run_cli("build", "--vllm", "0.23.0", "--patches", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and not (tmp_path / "o").exists()
    one_error(r, "is not a directory")
