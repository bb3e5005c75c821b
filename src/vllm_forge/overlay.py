"""Stage 3, overlay: turn the real base files of a vLLM wheel into their replacements.

The overlay is our hunks (vllm_overlay/<id>/*.patch) plus a manifest keyed by the sha256 of
the base files they apply to, with the sha256 each overlay must produce from that base.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ForgeError
from .fetch import safe_member_name
from .patching import AppliedPatch, apply_patch
from .pins import GEMMA4_LAYER, data_dir, version_key

PAGED_KV_REFUSAL = b"FA4 with paged KV is not supported on SM90"
HEAD_512_ACCEPTED = b"head_size <= 512"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def carries_fix(base_files: dict[str, bytes]) -> list[str]:
    """Evidence, read from the files themselves, that a vLLM release already has PR #38835."""
    evidence = []
    iface = base_files.get("vllm/vllm_flash_attn/flash_attn_interface.py", b"")
    backend = base_files.get("vllm/v1/attention/backends/flash_attn.py", b"")
    if iface and b"elif fa_version == 4:" in iface and PAGED_KV_REFUSAL not in iface:
        evidence.append("flash_attn_interface.py has no SM90 paged-KV refusal in its FA4 branch")
    if HEAD_512_ACCEPTED in backend:
        evidence.append("flash_attn.py accepts head_size <= 512")
    return evidence if len(evidence) == 2 else []


@dataclass(frozen=True)
class OverlayResult:
    overlay_id: str
    files: dict[str, bytes]              # wheel path -> replacement content
    bases: dict[str, str]                # wheel path -> base sha256
    patches: dict[str, AppliedPatch]     # wheel path -> the patch applied to it


@dataclass(frozen=True)
class Overlay:
    overlay_id: str
    root: Path
    patches: dict[str, str]              # wheel path -> patch file (relative to root)
    bases: dict[str, dict[str, Any]]     # base sha256 -> {path, seen_in, results: {overlay id: sha256}}
    adds: dict[str, str]                 # wheel path -> a file of ours (relative to root), added as is

    @property
    def paths(self) -> list[str]:
        return sorted(self.patches)

    def result_shas(self, path: str) -> set[str]:
        return {b["results"][self.overlay_id] for b in self.bases.values()
                if b["path"] == path and self.overlay_id in b["results"]}

    def apply_one(self, path: str, data: bytes, work: Path) -> tuple[bytes, AppliedPatch]:
        dst = work / path
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(data)
        applied = apply_patch(self.root / self.patches[path], work)
        return dst.read_bytes(), applied

    def apply(self, base_files: dict[str, bytes], release_files: bool = True) -> OverlayResult:
        """Apply to base_files (a release's own files, or the result of the layers below)."""
        missing = [p for p in self.paths if p not in base_files]
        if missing:
            raise ForgeError(f"base wheel has no {missing[0]}", f"overlay {self.overlay_id} needs it")
        out: dict[str, bytes] = {}
        bases: dict[str, str] = {}
        applied: dict[str, AppliedPatch] = {}
        with tempfile.TemporaryDirectory(prefix="vllm-forge-overlay-") as tmp:
            for path in self.paths:
                got = sha256(base_files[path])
                entry = self.bases.get(got)
                if entry is None or entry["path"] != path or self.overlay_id not in entry["results"]:
                    fixed = carries_fix(base_files) if release_files else []
                    if fixed:
                        raise ForgeError(
                            f"this vLLM already carries PR #38835 ({'; '.join(fixed)}): nothing to forge",
                            "use the release as it is")
                    known = [s[:12] for s, b in self.bases.items()
                             if b["path"] == path and self.overlay_id in b["results"]]
                    raise ForgeError(
                        f"drifted base file {path}: sha256 {got} is not one overlay "
                        f"{self.overlay_id} was made for (knows {', '.join(known) or 'none'})",
                        "port the overlay with `vllm-forge refresh`, or pick a pinned version",
                    )
                bases[path] = got
                result, applied[path] = self.apply_one(path, base_files[path], Path(tmp))
                want = entry["results"][self.overlay_id]
                if sha256(result) != want:
                    raise ForgeError(
                        f"overlay {self.overlay_id} produced {path} with sha256 {sha256(result)}, expected {want}",
                        "the overlay manifest and its patches disagree; regenerate the manifest",
                    )
                out[path] = result
        return OverlayResult(self.overlay_id, out, bases, applied)


def overlay_root(root: Path | None = None) -> Path:
    return root or data_dir() / "vllm_overlay"


def read_manifest(root: Path | None = None) -> dict[str, Any]:
    path = overlay_root(root) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict) or not isinstance(manifest["overlays"], dict) \
                or not isinstance(manifest["bases"], dict):
            raise TypeError("not an object with 'overlays' and 'bases'")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ForgeError(f"cannot read the overlay manifest {path}: {type(e).__name__}: {e}",
                         "reinstall vllm-forge, or fix the copy VLLM_FORGE_DATA_DIR points at") from None
    return manifest


def _inside(rel: object, where: str, manifest: Path) -> str:
    """A path the manifest names, checked to stay inside its tree (the overlay root or the wheel)."""
    if not isinstance(rel, str):
        raise ForgeError(f"{manifest}: {where} is {rel!r}, not a path", "fix the overlay manifest")
    try:
        safe_member_name(rel, str(manifest))
    except ForgeError:
        raise ForgeError(f"{manifest}: {where} {rel!r} leaves its tree",
                         "refusing it; overlay paths are relative, without '..'") from None
    return rel


def load_overlay(overlay_id: str, root: Path | None = None) -> Overlay:
    root = overlay_root(root)
    manifest = read_manifest(root)
    where = root / "manifest.json"
    try:
        spec = manifest["overlays"][overlay_id]
    except KeyError:
        raise ForgeError(f"unknown overlay {overlay_id!r} in {where}",
                         "check the overlay id in pins.json") from None
    try:
        files = {_inside(k, "a wheel path", where): _inside(v, "a patch", where) for k, v in spec["files"].items()}
        adds = {_inside(k, "a wheel path", where): _inside(v, "an added file", where)
                for k, v in spec.get("adds", {}).items()}
        bases = dict(manifest["bases"])
        for sha, entry in bases.items():
            _inside(entry["path"], "a base path", where)
            if not isinstance(entry["results"], dict):
                raise TypeError(f"results of base {sha[:12]} is not an object")
    except (KeyError, TypeError, AttributeError) as e:
        raise ForgeError(f"overlay {overlay_id!r} in {where} is malformed: {type(e).__name__}: {e}",
                         "fix the overlay manifest") from None
    for src in [*files.values(), *adds.values()]:
        if not (root / src).is_file():
            raise ForgeError(f"overlay {overlay_id!r} names {src}, which is not a file in {root}",
                             "fix the overlay manifest or restore the file")
    return Overlay(overlay_id, root, files, bases, adds)


@dataclass(frozen=True)
class Stack:
    """Overlays applied in order, each on the result of the ones before."""

    layers: list[Overlay]

    @property
    def ids(self) -> list[str]:
        return [o.overlay_id for o in self.layers]

    @property
    def paths(self) -> list[str]:
        return sorted({p for o in self.layers for p in o.paths})

    def adds(self) -> dict[str, bytes]:
        return {p: (o.root / src).read_bytes() for o in self.layers for p, src in o.adds.items()}

    def apply(self, base_files: dict[str, bytes]) -> tuple[dict[str, bytes], dict[str, list[dict[str, str]]]]:
        """Final content of every overlaid path, and per path what each layer did to it."""
        current = dict(base_files)
        done: dict[str, list[dict[str, str]]] = {}
        for i, layer in enumerate(self.layers):
            result = layer.apply({p: current[p] for p in layer.paths if p in current}, release_files=i == 0)
            current.update(result.files)
            for p, a in result.patches.items():
                done.setdefault(p, []).append({"overlay": layer.overlay_id, "base_sha256": result.bases[p],
                                               "patch": a.name, "patch_sha256": a.sha256})
        return {p: current[p] for p in self.paths}, done

    def final_shas(self, path: str) -> set[str]:
        """The sha256s the last layer touching path may leave it with."""
        last = [o for o in self.layers if path in o.patches][-1]
        return last.result_shas(path)


def load_stack(ids: list[str], root: Path | None = None) -> Stack:
    return Stack([load_overlay(i, root) for i in ids])


def made_for(overlay_id: str, root: Path | None = None) -> list[str]:
    """The releases an overlay applies to: those whose base files the manifest records for it."""
    manifest = read_manifest(root)
    try:
        paths = set(manifest["overlays"][overlay_id]["files"])
        return sorted({v for b in manifest["bases"].values() if b["path"] in paths
                       and overlay_id in b["results"] for v in b["seen_in"]}, key=version_key)
    except (KeyError, TypeError, AttributeError) as e:
        raise ForgeError(f"overlay {overlay_id!r} in {overlay_root(root) / 'manifest.json'} is malformed: "
                         f"{type(e).__name__}: {e}", "fix the overlay manifest") from None


def gemma4_fa4_for(version: str, requested: bool | None, root: Path | None = None) -> bool:
    """Whether a forged wheel of `version` carries the Gemma-4 FA4 selection (GEMMA4_LAYER).

    Default (requested None): exactly the releases whose own Gemma4Config forces TRITON_ATTN,
    i.e. whose base file the layer's manifest entries were made from (0.19.0-0.23.0); False is
    the user's opt-out (--no-gemma4-fa4); True on any other release is refused."""
    releases = made_for(GEMMA4_LAYER, root)
    if requested is None:
        return version in releases
    if requested and version not in releases:
        raise ForgeError(f"--gemma4-fa4: vLLM {version} does not force TRITON_ATTN for Gemma-4; the layer is made "
                         f"for the releases that do ({', '.join(releases)})",
                         "build without --gemma4-fa4 (from 0.24.0 vLLM selects FA4 for Gemma-4 itself)")
    return requested
