"""The user's own vLLM patches: `build --patches DIR`, `refresh --patches`, `export`.

DIR is a quilt series: a `series` file, unified diffs (`a/vllm/...`, `b/vllm/...`: paths as in the
wheel) against the release's own files, and `bases.json` ({path: sha256 of the release file the
patches were made on}), as the overlays are keyed by their base files' sha256: a series applies only
to the files it was made for; another release's files are refused, naming `refresh --patches`.
`export` writes such a series from an edited unpacked tree; `refresh --patches` ports one to another
release by three-way merge (git merge-file), reporting a conflict by patch, file and hunk.
At build, the patches are applied after the overlay stack; the stamp records them (names, sha256,
their text, the base and result sha256 of each file) and the version label gets `.u<series7>`;
`verify` rebuilds with them (from `--patches DIR`, else the stamp's copy).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ForgeError
from .patching import apply_patch, check_paths, read_series
from .series import series_hash

BASES = "bases.json"
NOT_OURS = ("vllm/vllm_flash_attn/cute/",)  # the FA4 tree: --fa-patches


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class UserSeries:
    dir: Path
    patches: tuple[Path, ...]
    files: tuple[str, ...]      # the wheel paths the patches change
    bases: dict[str, str]       # path -> sha256 of the release file they were made on

    @property
    def hash(self) -> str:
        return series_hash([_sha(p.read_bytes()) for p in self.patches])

    def stamp(self) -> dict[str, Any]:
        return {"series": self.hash, "bases": dict(sorted(self.bases.items())),
                "patches": [{"name": p.name, "sha256": _sha(p.read_bytes()), "text": p.read_text()}
                            for p in self.patches]}


def load_user_series(d: Path) -> UserSeries:
    if not d.is_dir():
        raise ForgeError(f"--patches {d} is not a directory", "give the directory of your vLLM patch series")
    patches = read_series(d)
    if not patches:
        raise ForgeError(f"--patches {d} has no patches", "add a `series` file and its patches (`vllm-forge export`)")
    files: list[str] = []
    for p in patches:
        for path in check_paths(p):
            if not path.startswith("vllm/") or path.startswith(NOT_OURS) or not path.endswith(".py"):
                raise ForgeError(f"patch {p.name} touches {path!r}: not a .py file of vLLM outside its FA4 tree",
                                 "patch vllm/**/*.py only (FA4: --fa-patches)")
            if path not in files:
                files.append(path)
    try:
        bases = json.loads((d / BASES).read_text())
        if not isinstance(bases, dict):
            raise ValueError("not an object")
    except (OSError, ValueError) as e:
        raise ForgeError(f"--patches {d}: cannot read {BASES} ({type(e).__name__}: {e})",
                         "write the series with `vllm-forge export` (it records the release files' sha256)") from None
    for path in files:
        if not isinstance(bases.get(path), str) or not re.fullmatch(r"[0-9a-f]{64}", bases[path]):
            raise ForgeError(f"--patches {d}: {BASES} has no sha256 for {path}",
                             "write the series with `vllm-forge export` or `vllm-forge refresh --patches`")
    return UserSeries(d, tuple(patches), tuple(files), {p: str(bases[p]) for p in files})


def apply_user_series(us: UserSeries, version: str, release: dict[str, bytes], current: dict[str, bytes],
                      work: Path) -> dict[str, bytes]:
    """The patched files: each must be the release file the series was made on (bases.json); the patches
    apply to `current` (the overlay stack's result where it changed the file, else the release's)."""
    for path in us.files:
        if path not in release:
            raise ForgeError(f"your patches change {path}, which vLLM {version}'s wheel lacks",
                             "port them with `vllm-forge refresh --patches DIR --from <their release> "
                             f"--to {version}`")
        if _sha(release[path]) != us.bases[path]:
            raise ForgeError(f"your patches in {us.dir} were made on {path} sha256 {us.bases[path][:12]}, "
                             f"vLLM {version}'s is {_sha(release[path])[:12]}",
                             f"port them with `vllm-forge refresh --patches {us.dir} --from <their release> "
                             f"--to {version}`")
    tree = work / "user-tree"
    for path in us.files:
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        (tree / path).write_bytes(current.get(path, release[path]))
    for p in us.patches:
        apply_patch(p, tree)
    return {path: (tree / path).read_bytes() for path in us.files}


def write_series(out: Path, patches: dict[str, str], bases: dict[str, str]) -> Path:
    """A series directory, whole or not at all (out must not exist)."""
    if out.exists():
        raise ForgeError(f"--out {out} exists", "give a new directory for the series")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part"))
    except OSError as e:
        raise ForgeError(f"cannot create {out}: {e.strerror or e}", "give a writable --out") from None
    try:
        for name, text in patches.items():
            (tmp / name).write_text(text)
        (tmp / "series").write_text("".join(f"{n}\n" for n in patches))
        (tmp / BASES).write_text(json.dumps(dict(sorted(bases.items())), indent=2) + "\n")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# --- release files, read from the cached wheel or by range requests --------------------------------

def release_files(version: str, paths: Iterable[str], index_url: str | None = None,
                  record: bool = False) -> dict[str, bytes]:
    """Members of vLLM `version`'s x86_64 wheel (the Python is the same on aarch64: pins.json), from the
    download cache if it is there and intact, else by HTTP range requests. record: also its RECORD."""
    from .assemble import dist_info_dir
    from .fetch import Index, pinned_wheel_source
    from .pins import load_pins

    pins = load_pins()
    vpin = pins.for_version(version, servable=False)
    want = set(paths)
    source, _ = pinned_wheel_source(lambda: Index(index_url), pins.index_project, vpin.wheel, vpin.wheel_sha256)
    with zipfile.ZipFile(source) as zf:  # type: ignore[arg-type]
        if record:
            want.add(f"{dist_info_dir(zf, vpin.wheel)}/RECORD")
        return {n: zf.read(n) for n in sorted(want) if n in zf.NameToInfo}


def refresh_user_series(patch_dir: Path, from_version: str, to_version: str, out: Path,
                        index_url: str | None = None, conflicts_dir: Path | None = None) -> Path:
    """Port the series (made on `from_version`'s files) to `to_version`'s: each patch's change merged onto
    the new files with git merge-file; the ported series is written to `out` only when every hunk merged."""
    from .refresh import diff, merge3

    us = load_user_series(patch_dir)
    old = release_files(from_version, us.files, index_url)
    new = release_files(to_version, us.files, index_url)
    for path in us.files:
        if path not in old or _sha(old[path]) != us.bases[path]:
            raise ForgeError(f"{patch_dir} was not made on vLLM {from_version}'s {path}",
                             "give --from the release the series was made on (its bases.json)")
        if path not in new:
            raise ForgeError(f"vLLM {to_version}'s wheel has no {path}", "port that patch by hand")
    ported: dict[str, str] = {}
    conflicts: list[str] = []
    with tempfile.TemporaryDirectory(prefix="vllm-forge-refresh-patches-") as tmp:
        work, cur_old, cur_new = Path(tmp), dict(old), dict(new)
        for i, patch in enumerate(us.patches):
            touched = sorted(set(check_paths(patch)))
            stage = work / f"apply{i}"
            for f in touched:
                (stage / f).parent.mkdir(parents=True, exist_ok=True)
                (stage / f).write_bytes(cur_old[f])
            apply_patch(patch, stage)
            texts = []
            for f in touched:
                after = (stage / f).read_bytes()
                merged, starts = merge3(cur_new[f], cur_old[f], after, work / f"merge{i}" / f.replace("/", "_"))
                if starts:
                    conflicts.append(f"{patch.name}: {f} {len(starts)} hunk(s) at merged lines "
                                     + ", ".join(map(str, starts)))
                    if conflicts_dir is not None:
                        (conflicts_dir / patch.name / f).parent.mkdir(parents=True, exist_ok=True)
                        (conflicts_dir / patch.name / f).write_bytes(merged)
                    continue
                texts.append(diff(f, cur_new[f], merged, work / f"diff{i}" / f.replace("/", "_")))
                cur_new[f], cur_old[f] = merged, after
            ported[patch.name] = patch.read_text().split("diff --git", 1)[0].split("--- a/", 1)[0] + "".join(texts)
    if conflicts:
        raise ForgeError(f"refresh conflict porting {patch_dir} from vLLM {from_version} to {to_version}: "
                         + "; ".join(conflicts),
                         "resolve those hunks by hand on the new release's files"
                         + (f" (merged files with markers in {conflicts_dir})" if conflicts_dir else
                            " (--conflicts DIR keeps the merged files)") + "; nothing was written")
    made = write_series(out, ported, {f: _sha(new[f]) for f in us.files})
    with tempfile.TemporaryDirectory(prefix="vllm-forge-refresh-check-") as tmp:  # it must apply to what it ports to
        try:
            got = apply_user_series(load_user_series(made), to_version, new, {}, Path(tmp))
        except ForgeError:
            shutil.rmtree(made, ignore_errors=True)
            raise
    if got != {f: cur_new[f] for f in us.files}:
        shutil.rmtree(made, ignore_errors=True)
        raise ForgeError(f"the ported series does not reproduce the merge on vLLM {to_version}'s files",
                         "port it by hand; nothing was written")
    return made


def export_series(version: str, tree: Path, out: Path, index_url: str | None = None) -> tuple[Path, list[str]]:
    """A series from an edited unpacked tree of vLLM `version` (its `vllm/` directory, e.g. a pip --target
    or an unpacked wheel; files may be missing): one patch per changed .py file, against the release's
    own file, found by the RECORD sha256 (new files are not exported)."""
    import base64
    import csv
    import io

    from .refresh import diff

    if not (tree / "vllm").is_dir():
        raise ForgeError(f"--tree {tree} has no vllm/ directory", "give the directory that holds the edited vllm/")
    files = release_files(version, [], index_url, record=True)
    record = next(d for n, d in files.items() if n.endswith("/RECORD"))
    shas = {}
    for row in csv.reader(io.StringIO(record.decode())):
        if len(row) >= 2 and row[1].startswith("sha256=") and row[0].endswith(".py") and row[0].startswith("vllm/") \
                and not row[0].startswith(NOT_OURS):
            d = row[1][len("sha256="):]
            shas[row[0]] = base64.urlsafe_b64decode(d + "=" * (-len(d) % 4)).hex()
    changed = []
    for path, sha in sorted(shas.items()):
        f = tree / path
        if f.is_file() and not f.is_symlink() and _sha(f.read_bytes()) != sha:
            changed.append(path)
    if not changed:
        raise ForgeError(f"no .py file under {tree / 'vllm'} differs from vLLM {version}'s",
                         "edit the unpacked tree first (or give the --vllm it was unpacked from)")
    orig = release_files(version, changed, index_url)
    patches: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="vllm-forge-export-") as tmp:
        for i, path in enumerate(changed, 1):
            name = f"{i:04d}-{re.sub(r'[^A-Za-z0-9]+', '-', path.removesuffix('.py'))[:60]}.patch"
            patches[name] = diff(path, orig[path], (tree / path).read_bytes(), Path(tmp) / str(i))
    return write_series(out, patches, {p: _sha(orig[p]) for p in changed}), changed
