"""Stage 3, overlay: turn the real base files of a vLLM wheel into their replacements.

The overlay is our hunks (vllm_overlay/<id>/*.patch) plus a manifest keyed by the sha256 of
the base files they apply to, and the sha256 each result must have.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ForgeError
from .patching import AppliedPatch, apply_patch
from .pins import data_dir


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class OverlayResult:
    overlay_id: str
    files: dict[str, bytes]          # wheel path -> replacement content
    bases: dict[str, str]            # wheel path -> base sha256
    patches: dict[str, AppliedPatch]  # wheel path -> the patch applied to it


@dataclass(frozen=True)
class Overlay:
    overlay_id: str
    root: Path
    patches: dict[str, str]          # wheel path -> patch file (relative to root)
    bases: dict[str, dict[str, str]]  # base sha256 -> {path, overlay, result_sha256}

    @property
    def paths(self) -> list[str]:
        return sorted(self.patches)

    def result_shas(self, path: str) -> set[str]:
        return {b["result_sha256"] for b in self.bases.values()
                if b["overlay"] == self.overlay_id and b["path"] == path}

    def apply(self, base_files: dict[str, bytes]) -> OverlayResult:
        out: dict[str, bytes] = {}
        bases: dict[str, str] = {}
        applied: dict[str, AppliedPatch] = {}
        with tempfile.TemporaryDirectory(prefix="vllm-forge-overlay-") as tmp:
            work = Path(tmp) / "tree"
            for path in self.paths:
                if path not in base_files:
                    raise ForgeError(f"base wheel has no {path}", f"overlay {self.overlay_id} needs it")
                data = base_files[path]
                got = sha256(data)
                entry = self.bases.get(got)
                if entry is None or entry["path"] != path or entry["overlay"] != self.overlay_id:
                    known = [s[:12] for s, b in self.bases.items() if b["path"] == path]
                    raise ForgeError(
                        f"drifted base file {path}: sha256 {got} is not one overlay "
                        f"{self.overlay_id} was made for (knows {', '.join(known) or 'none'})",
                        "port the overlay to this release (vllm-forge refresh) or pick a pinned version",
                    )
                bases[path] = got
                dst = work / path
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(data)
                applied[path] = apply_patch(self.root / self.patches[path], work)
                result = dst.read_bytes()
                if sha256(result) != entry["result_sha256"]:
                    raise ForgeError(
                        f"overlay {self.overlay_id} produced {path} with sha256 {sha256(result)}, "
                        f"expected {entry['result_sha256']}",
                        "the overlay manifest and its patches disagree; regenerate the manifest",
                    )
                out[path] = result
        return OverlayResult(self.overlay_id, out, bases, applied)


def load_overlay(overlay_id: str, root: Path | None = None) -> Overlay:
    root = root or data_dir() / "vllm_overlay"
    manifest = json.loads((root / "manifest.json").read_text())
    try:
        spec = manifest["overlays"][overlay_id]
    except KeyError:
        raise ForgeError(f"unknown overlay {overlay_id!r} in {root / 'manifest.json'}",
                         "check the overlay id in pins.json") from None
    return Overlay(overlay_id, root, dict(spec["files"]), dict(manifest["bases"]))
