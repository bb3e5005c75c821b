"""`vllm-forge refresh --fa-series`: port a flash-attention patch series to another FA pin.

The series of the `--from` release's FA pin is replayed patch by patch: each patch's change to the
old pin's tree (old -> old + patch) is merged onto the new pin's tree with `git merge-file`
(a three-way merge), and the merged result, diffed against the new tree, becomes the ported
patch. Both trees come through the tool's verified mirror chain (for a release, its own wheel,
read by HTTP range requests, tree-hash checked). A clean port is written as
patches/flash-attention/<pin7>/ with its provenance in the series manifest, unvalidated; a
conflict is reported by patch, file and hunk, and nothing is written (with --conflicts DIR the
merged files with conflict markers are left there, to be resolved by hand as kernel work).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cache
from pathlib import Path

from .errors import ForgeError
from .fa4 import (
    CUTE,
    FaTarget,
    Tree,
    cmake_install_fa4,
    fa_target,
    get_fa4_sources,
    no_series,
    tree_sha256,
    write_tree,
)
from .fetch import Index
from .patching import apply_patch, apply_series, check_paths, read_series
from .pins import load_pins
from .refresh import diff, merge3
from .series import (
    dir_series_hash,
    read_manifest,
    series_for,
    series_root,
    write_manifest,
)


@dataclass
class SeriesPort:
    dir: Path
    patches: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


@dataclass
class Conflict:
    patch: str
    file: str
    lines: list[int]

    def __str__(self) -> str:
        return f"{self.patch}: {self.file} {len(self.lines)} hunk(s) at merged lines {', '.join(map(str, self.lines))}"


def pin_tree(target: FaTarget, work: Path, index_url: str | None = None) -> Tree:
    """The pin's flash_attn/cute tree (upstream imports), tree-hash verified, without any series."""
    src = get_fa4_sources(target, work, cache(lambda: Index(index_url)), load_pins().index_project,
                          patch_dir=no_series(work))
    return src.upstream


def touched(patch: Path) -> list[str]:
    """The cute files a patch changes (relative to flash_attn/cute)."""
    out = []
    for path in check_paths(patch):
        if not path.startswith(CUTE + "/"):
            raise ForgeError(f"{patch.name} changes {path}, outside {CUTE}", "a series changes FA4 files only")
        out.append(path[len(CUTE) + 1:])
    return sorted(set(out))


def port_series(old: Tree, new: Tree, patches: list[Path], work: Path) -> tuple[dict[str, str], list[Conflict],
                                                                                dict[str, bytes]]:
    """Replay each patch's change onto the new tree: {patch name: ported text}, conflicts, and the
    merged files (with conflict markers where they failed)."""
    old, new = dict(old), dict(new)
    ported: dict[str, str] = {}
    conflicts: list[Conflict] = []
    marked: dict[str, bytes] = {}
    for i, patch in enumerate(patches):
        files = touched(patch)
        stage = work / f"apply{i}"
        write_tree({f: old[f] for f in files if f in old}, stage / CUTE)
        apply_patch(patch, stage)
        after_old = {f: (stage / CUTE / f).read_bytes() for f in files if (stage / CUTE / f).is_file()}
        texts = []
        for f in files:
            if f not in old or f not in new:
                raise ForgeError(f"{patch.name} changes {CUTE}/{f}, which one of the pins lacks",
                                 "port that patch by hand")
            merged, starts = merge3(new[f], old[f], after_old[f], work / f"merge{i}" / f.replace("/", "_"))
            if starts:
                conflicts.append(Conflict(patch.name, f"{CUTE}/{f}", starts))
                marked[f"{patch.name}/{f}"] = merged
                continue
            texts.append(diff(f"{CUTE}/{f}", new[f], merged, work / f"diff{i}" / f.replace("/", "_")))
            new[f] = merged
            old[f] = after_old[f]
        header = patch.read_text().split("diff --git", 1)[0]
        ported[patch.name] = header + "".join(texts)
    return ported, conflicts, marked


def refresh_fa_series(from_version: str, to_version: str, data: Path | None = None,
                      conflicts_dir: Path | None = None, index_url: str | None = None) -> SeriesPort:
    pins = load_pins(data / "pins.json" if data else None)
    src_t = fa_target(pins, pins.for_version(from_version))
    dst_t = fa_target(pins, pins.for_version(to_version))
    root = series_root(data / "patches" / "flash-attention" if data else None)
    series = series_for(src_t.cute_tree_sha256, root)
    if series is None:
        raise ForgeError(f"vLLM {from_version}'s FA pin {src_t.short} has no series to port",
                         "name a --from release whose pin has one (patches/flash-attention/manifest.json)")
    existing = series_for(dst_t.cute_tree_sha256, root)
    if existing is not None:
        raise ForgeError(f"vLLM {to_version}'s FA pin {dst_t.short} already has series {existing.dir.name}",
                         "remove it from patches/flash-attention/manifest.json to port it again")
    patches = read_series(series.dir)
    print(f"vllm-forge: porting series {series.dir.name} ({len(patches)} patches) from flash-attention "
          f"{src_t.short} to {dst_t.short} (vLLM {to_version})", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="vllm-forge-refresh-fa-") as tmp:
        work = Path(tmp)
        old = pin_tree(src_t, work / "old", index_url)
        new = pin_tree(dst_t, work / "new", index_url)
        ported, conflicts, marked = port_series(old, new, patches, work / "port")
        if conflicts:
            if conflicts_dir is not None:
                for rel, data_ in marked.items():
                    (conflicts_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                    (conflicts_dir / rel).write_bytes(data_)
            raise ForgeError(f"refresh conflict porting series {series.dir.name} to flash-attention "
                             f"{dst_t.short}: " + "; ".join(map(str, conflicts)),
                             "resolve those hunks by hand (kernel work"
                             + (f"; merged files with markers in {conflicts_dir}" if conflicts_dir else
                                "; --conflicts DIR keeps the merged files") + "), nothing was written")
        # the ported series must apply with git apply on the new pin and give the merged tree
        trial = work / "trial"
        out_dir = work / "out" / dst_t.short
        out_dir.mkdir(parents=True)
        for name, text in ported.items():
            (out_dir / name).write_text(text)
        (out_dir / "series").write_text("".join(f"{p.name}\n" for p in patches))
        write_tree(new, trial / CUTE)
        apply_series(out_dir, trial)
        patched_tree = tree_sha256(cmake_install_fa4(trial, work, dst_t.commit))
        final = root / dst_t.short
        if final.exists():
            raise ForgeError(f"{final} exists but the manifest does not name it", "remove it, then port again")
        shutil.copytree(out_dir, final)
    manifest = read_manifest(root)
    manifest["series"][dst_t.cute_tree_sha256] = {
        "commit": dst_t.commit, "dir": dst_t.short, "validation": None,
        "patched": {"series": dir_series_hash(final), "tree_sha256": patched_tree},
        "ported_from": {"dir": series.dir.name, "commit": src_t.commit, "tree_sha256": src_t.cute_tree_sha256,
                        "series": dir_series_hash(series.dir), "how": "vllm-forge refresh --fa-series: "
                        "git merge-file per patch onto the new pin, clean",
                        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}}
    write_manifest(manifest, root)
    files = sorted({f for p in patches for f in touched(p)})
    return SeriesPort(final, [p.name for p in patches], files)


