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
    try:
        text = series.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ForgeError(f"cannot read the patch series {series}: {e}", "fix the series file") from None
    names = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
    patches = []
    for n in filter(None, names):
        n = n.split()[0]  # quilt allows options (-p1) after the name
        if n.startswith("/") or "\\" in n or ".." in n.split("/"):
            raise ForgeError(f"{series} lists {n!r}, which is not a file of {patch_dir}",
                             "a series names patch files in its own directory")
        p = patch_dir / n
        if not p.is_file():
            raise ForgeError(f"{series} lists {p.name}, which does not exist",
                             "fix the series file")
        patches.append(p)
    return patches


_PATH_LINE = re.compile(r"^(?:--- |\+\+\+ |rename from |rename to |copy from |copy to )(.*)$")
_GIT_HEADER = re.compile(r"^diff --git (\S+) (\S+)$")


def _strip_path(raw: str) -> str:
    """A patch header's path: without the timestamp diff adds after a tab, quotes and a/ b/."""
    path = raw.split("\t", 1)[0].strip()
    if len(path) > 1 and path[0] == path[-1] == '"':
        path = path[1:-1]
    return path


def check_paths(patch: Path) -> list[str]:
    """The paths a patch touches; refuse one that leaves the tree (absolute, `..`) or makes a link,
    before git apply sees it."""
    try:
        text = patch.read_text(errors="replace")
    except OSError as e:
        raise ForgeError(f"cannot read patch {patch}: {e.strerror or e}", "check the patch directory") from None
    paths: list[str] = []
    for line in text.splitlines():
        m = _PATH_LINE.match(line)
        g = _GIT_HEADER.match(line)
        if line.startswith(("new file mode 120000", "new mode 120000", "old mode 120000")):
            raise ForgeError(f"patch {patch.name} makes a symbolic link",
                             "refusing to apply it; patches change files only")
        raws = [m.group(1)] if m else list(g.groups()) if g else []
        for raw in raws:
            path = _strip_path(raw)
            if path == "/dev/null":
                continue
            rel = path.split("/", 1)[1] if path.startswith(("a/", "b/")) and not line.startswith(("rename", "copy")) \
                else path
            parts = rel.split("/")
            if not rel or rel.startswith("/") or ".." in parts or "\\" in rel or (len(rel) > 1 and rel[1] == ":"):
                raise ForgeError(f"patch {patch.name} touches {path!r}, outside the tree it patches",
                                 "refusing to apply it; patch paths must be a/<file> and b/<file> inside the tree")
            paths.append(rel)
    return paths


def apply_patch(patch: Path, root: Path) -> AppliedPatch:
    """Apply one patch (paths with a/ b/ prefixes) to the files under root, or refuse."""
    check_paths(patch)
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


def check_series(patch_dir: Path, inside: str, suffix: str) -> None:
    """Refuse a series with a patch that touches a path outside `inside`/ or not ending in `suffix`:
    its change would be recorded as applied (stamp, version label) yet be in no file of the output."""
    for patch in read_series(patch_dir):
        for path in check_paths(patch):
            if not (path.startswith(inside + "/") and path.endswith(suffix)):
                raise ForgeError(f"patch {patch.name} touches {path!r}, outside {inside}/*{suffix} "
                                 "(the only files a forged wheel carries from this tree)",
                                 f"refusing the series {patch_dir}; patch only {inside}/ *{suffix} files")


def apply_series(patch_dir: Path, root: Path) -> list[AppliedPatch]:
    return [apply_patch(p, root) for p in read_series(patch_dir)]
