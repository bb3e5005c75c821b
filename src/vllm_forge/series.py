"""Flash-attention patch series: one per FA pin, keyed by the pin's cute tree hash.

patches/flash-attention/manifest.json maps the tree hash of a pinned FA4 tree (as vLLM's CMake
rewrites it, fa4.tree_sha256) to the directory holding its series (quilt `series` + patches),
where it came from (written by hand, or ported by `vllm-forge refresh --fa-series`), and the GPU
validation it passed. A series ships by default only with a validation record whose series hash
is the series' current one. Each entry also records `patched`: the series hash and the tree hash
(fa4.tree_sha256, as the wheel carries it) of the pin with the series applied, which `verify`
checks a wheel's FA4 tree against without trusting anything the wheel says.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ForgeError
from .patching import read_series
from .pins import data_dir

MANIFEST = "manifest.json"


def series_root(root: Path | None = None) -> Path:
    return root or data_dir() / "patches" / "flash-attention"


def series_sha256(patch_sha256s: list[str]) -> str:
    """The hash of a series: over its patches' sha256, in order."""
    return hashlib.sha256("".join(patch_sha256s).encode()).hexdigest()


def series_hash(patch_sha256s: list[str]) -> str:
    """The short hash that names a series in version labels (series_sha256's first 7 hex digits)."""
    return series_sha256(patch_sha256s)[:7]


def dir_series_hash(patch_dir: Path) -> str:
    return series_hash([hashlib.sha256(p.read_bytes()).hexdigest() for p in read_series(patch_dir)])


@dataclass(frozen=True)
class Series:
    pin_tree_sha256: str
    commit: str
    dir: Path
    ported_from: dict[str, Any] | None
    validation: dict[str, Any] | None
    patched: dict[str, Any] | None = None

    @property
    def hash(self) -> str:
        return dir_series_hash(self.dir)

    def validated(self) -> str:
        """Why this series may not ship by default ("" when it may)."""
        if not self.validation:
            return "it has no GPU validation record"
        if self.validation.get("series") != self.hash:
            return (f"its GPU validation was of series {self.validation.get('series')}, "
                    f"the series is now {self.hash}")
        if not self.validation.get("passed"):
            return f"its GPU validation failed: {self.validation.get('summary', 'see the record')}"
        return ""

    def patched_tree_sha256(self) -> str | None:
        """The recorded tree hash of the pin with this series applied, if recorded for this series."""
        if not self.patched or self.patched.get("series") != self.hash:
            return None
        return str(self.patched.get("tree_sha256") or "") or None


def read_manifest(root: Path | None = None) -> dict[str, Any]:
    path = series_root(root) / MANIFEST
    try:
        raw = json.loads(path.read_text())
        raw["series"].items()
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise ForgeError(f"cannot read the flash-attention series manifest {path}: {e}",
                         "reinstall vllm-forge or restore patches/flash-attention/manifest.json") from None
    return raw  # type: ignore[no-any-return]


def write_manifest(manifest: dict[str, Any], root: Path | None = None) -> None:
    (series_root(root) / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def series_for(pin_tree_sha256: str, root: Path | None = None) -> Series | None:
    """The series of a pin: from `root`'s manifest, or (root None) the tool's own, else the user data
    directory's (the ones `vllm-forge pin` ported)."""
    from .validation import user_data_dir

    user = user_data_dir() / "patches" / "flash-attention"
    roots = [series_root(root)] if root is not None else [series_root(), user]
    for i, where in enumerate(roots):
        if i and not (where / MANIFEST).is_file():
            continue
        entry = read_manifest(where)["series"].get(pin_tree_sha256)
        if entry is None:
            continue
        d = where / entry["dir"]
        if not d.is_dir() or ".." in Path(entry["dir"]).parts or Path(entry["dir"]).is_absolute():
            raise ForgeError(f"series manifest names {entry['dir']!r}, not a directory under {where}",
                             f"fix {where / MANIFEST}")
        return Series(pin_tree_sha256, entry["commit"], d, entry.get("ported_from"), entry.get("validation"),
                      entry.get("patched"))
    return None
