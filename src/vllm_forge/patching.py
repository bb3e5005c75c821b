"""Applying unified diffs (ours: patches/ and vllm_overlay/) to real upstream files, with git apply."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import git

from .errors import ForgeError


@dataclass(frozen=True)
class AppliedPatch:
    name: str
    sha256: str


def read_series(patch_dir: Path) -> list[Path]:
    """The patches of a directory, in the order of its `series` file (quilt style).

    Without a series file, every *.patch in name order.
    """
    series = patch_dir / "series"
    if not series.is_file():
        return sorted(patch_dir.glob("*.patch"))
    names = [ln.split("#", 1)[0].strip() for ln in series.read_text().splitlines()]
    patches = [patch_dir / n for n in names if n]
    for p in patches:
        if not p.is_file():
            raise ForgeError(f"{series} lists {p.name}, which does not exist",
                             "fix the series file")
    return patches


def patch_paths(patch: Path) -> list[str]:
    """The paths a patch changes (its ---/+++ lines, a/ b/ prefixes dropped), refusing any that
    would leave the tree it is applied to."""
    out = []
    for ln in patch.read_text(errors="replace").splitlines():
        if ln.startswith(("--- ", "+++ ")):
            name = ln[4:].split("\t", 1)[0].strip()
            if name == "/dev/null":
                continue
            rel = name[2:] if name.startswith(("a/", "b/")) else name
            if name.startswith("/") or ".." in Path(rel).parts or not rel:
                raise ForgeError(f"patch {patch.name} touches {name!r}, outside the tree it applies to",
                                 "refusing it; fix the patch")
            out.append(rel)
    return out


def apply_patch(patch: Path, root: Path) -> AppliedPatch:
    """Apply one patch (paths with a/ b/ prefixes) to the files under root, or refuse."""
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(root.parent)}
    try:
        git.Git(str(root)).execute(
            ["git", "apply", "--whitespace=nowarn", str(patch.resolve())], env=env
        )
    except git.GitCommandError as e:
        stderr = str(e.stderr or "")
        where = re.search(r"patch failed: (\S+?):(\d+)", stderr)
        missing = re.search(r"error: (\S+?): (No such file or directory|does not exist in index)", stderr)
        if where:
            detail = f"{where.group(1)} (hunk at line {where.group(2)})"
        elif missing:
            detail = f"{missing.group(1)} (file not found)"
        else:
            detail = stderr.strip().splitlines()[-1] if stderr.strip() else "unknown reason"
        raise ForgeError(
            f"patch {patch.name} does not apply to {detail}",
            "the upstream file differs from what the patch expects; refresh the patch",
        ) from None
    return AppliedPatch(patch.name, hashlib.sha256(patch.read_bytes()).hexdigest())


def apply_series(patch_dir: Path, root: Path) -> list[AppliedPatch]:
    return [apply_patch(p, root) for p in read_series(patch_dir)]
