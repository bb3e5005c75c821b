"""`vllm-forge refresh`: port an overlay to another vLLM release with a three-way merge.

For each overlaid file: merge (git merge-file) our change (old base -> our result) onto the
new release's file. Bases the manifest already knows are reused; a clean merge becomes a new
patch and manifest entry; a conflict is reported by file and hunk, and nothing is written.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import git

from .assemble import read_base
from .errors import ForgeError
from .fetch import Index, cached_download
from .output import write_text_atomic
from .overlay import carries_fix, load_overlay, overlay_root, read_manifest, sha256
from .pins import data_dir, load_pins, version_key


@dataclass
class RefreshReport:
    overlay_id: str
    reused: list[str] = field(default_factory=list)
    merged: list[str] = field(default_factory=list)


def merge3(current: bytes, base: bytes, ours: bytes, work: Path) -> tuple[bytes, list[int]]:
    """git merge-file of our change (base -> ours) onto current: the result (with conflict markers
    where it failed) and the merged line numbers where each conflict starts."""
    work.mkdir(parents=True, exist_ok=True)
    names = ("new", "old", "ours")
    for n, data in zip(names, (current, base, ours), strict=True):
        (work / n).write_bytes(data)
    g = git.Git(str(work))
    status, merged, _ = g.execute(["git", "merge-file", "-p", "-L", "new", "-L", "old base",
                                   "-L", "vllm-forge", *names], with_extended_output=True, with_exceptions=False,
                                  strip_newline_in_stdout=False)
    out = merged.encode() if isinstance(merged, str) else bytes(merged)
    starts = [i + 1 for i, ln in enumerate(out.decode(errors="replace").splitlines()) if ln.startswith("<<<<<<< ")]
    if status != 0 and not starts:
        raise ForgeError(f"git merge-file failed (status {status})", "check that git is installed")
    return out, starts


def _merge(current: bytes, base: bytes, ours: bytes, path: str, work: Path) -> bytes:
    merged, starts = merge3(current, base, ours, work)
    if starts:
        raise ForgeError(f"refresh conflict in {path}: {len(starts)} hunk(s), at merged lines "
                         f"{', '.join(map(str, starts))}",
                         "port that hunk by hand on the new release's file, then add it to vllm_overlay/")
    return merged


def diff(path: str, before: bytes, after: bytes, work: Path) -> str:
    for side, data in (("a", before), ("b", after)):
        f = work / side / path
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(data)
    g = git.Git(str(work))
    _, out, _ = g.execute(["git", "diff", "--no-index", "--no-color", "--src-prefix=", "--dst-prefix=",
                           f"a/{path}", f"b/{path}"], with_extended_output=True, with_exceptions=False,
                          strip_newline_in_stdout=False)
    return re.sub(r"^index [0-9a-f]+\.\.[0-9a-f]+.*\n", "", str(out), flags=re.M)


def refresh(from_version: str, to_version: str, data: Path | None = None, force: bool = False) -> RefreshReport:
    data = data or data_dir()
    pins = load_pins(data / "pins.json")
    src, dst = pins.for_version(from_version), pins.for_version(to_version)
    overlay = load_overlay(src.overlay, overlay_root(data / "vllm_overlay"))
    index = cache(lambda: Index())
    wheel = {v.version: cached_download(index, pins.index_project, v.wheel, v.wheel_sha256) for v in (src, dst)}
    old_files, _ = read_base(wheel[src.version], src.version, overlay.paths)
    new_files, _ = read_base(wheel[dst.version], dst.version, overlay.paths)
    fixed = carries_fix(new_files)
    if fixed and not force:
        raise ForgeError(f"vLLM {to_version} already carries PR #38835 ({'; '.join(fixed)})",
                         "no overlay is needed for it (--force merges anyway)")
    new_id = f"{overlay.overlay_id.split('@')[0]}@{to_version}"
    manifest = read_manifest(overlay.root)
    report = RefreshReport(new_id)
    spec = {"description": manifest["overlays"][overlay.overlay_id]["description"],
            "derived_from": overlay.overlay_id, "made_for": to_version, "files": {}}
    new_patches: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="vllm-forge-refresh-") as tmp:
        for path in overlay.paths:
            work = Path(tmp) / sha256(path.encode())[:8]
            work.mkdir()
            ours, _ = overlay.apply_one(path, old_files[path], work / "apply")
            new_sha = sha256(new_files[path])
            entry = manifest["bases"].get(new_sha)
            if entry and overlay.overlay_id in entry["results"]:  # same base as before: same patch
                spec["files"][path] = overlay.patches[path]
                result = entry["results"][overlay.overlay_id]
                report.reused.append(path)
            else:
                merged = _merge(new_files[path], old_files[path], ours, path, work)
                name = f"{new_id}/{Path(path).name}.patch"
                new_patches[name] = diff(path, new_files[path], merged, work / "diff")
                spec["files"][path] = name
                result = sha256(merged)
                report.merged.append(path)
            base = manifest["bases"].setdefault(new_sha, {"path": path, "seen_in": [], "results": {}})
            base["results"][new_id] = result
            if to_version not in base["seen_in"]:
                base["seen_in"] = sorted([*base["seen_in"], to_version], key=version_key)
    manifest["overlays"][new_id] = spec
    with tempfile.TemporaryDirectory(prefix="vllm-forge-refresh-") as tmp:
        # write into a copy first: the new overlay must reproduce its own manifest on the real base
        trial = Path(tmp) / "vllm_overlay"
        shutil.copytree(overlay.root, trial)
        _write(trial, manifest, new_patches)
        load_overlay(new_id, trial).apply(new_files)
    raw = json.loads((data / "pins.json").read_text())
    raw["vllm"][to_version]["overlay"] = new_id
    _write(overlay.root, manifest, new_patches, data / "pins.json", json.dumps(raw, indent=2) + "\n")
    return report


def _write(root: Path, manifest: dict[str, Any], patches: dict[str, str], pins: Path | None = None,
           pins_text: str = "") -> None:
    """New patch files, then the manifest, then pins.json, each written whole or not at all; a
    failure (ENOSPC, EROFS...) removes the patch files this wrote, so the data dir stays as it was."""
    written: list[Path] = []
    try:
        for name, text in patches.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(root / name, text)
            written.append(root / name)
        old_manifest = (root / "manifest.json").read_text()
        write_text_atomic(root / "manifest.json", json.dumps(manifest, indent=2) + "\n")
        if pins is not None:
            try:
                write_text_atomic(pins, pins_text)
            except BaseException:
                write_text_atomic(root / "manifest.json", old_manifest)
                raise
    except BaseException:
        for p in written:
            p.unlink(missing_ok=True)
        raise
