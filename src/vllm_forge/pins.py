"""Stage 1, resolve: the pinned inputs for a vLLM version, read from pins.json."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import ForgeError


def data_dir() -> Path:
    """Where pins.json, cmake/, patches/ and vllm_overlay/ live.

    Installed: inside the package (scikit-build-core copies them there).
    From a source checkout: the repository root.
    """
    override = os.environ.get("VLLM_FORGE_DATA_DIR")
    if override:
        return Path(override)
    installed = Path(str(resources.files("vllm_forge"))) / "data"
    if (installed / "pins.json").is_file():
        return installed
    return Path(__file__).resolve().parents[2]


FA4_MODES = ("bundled", "system", "both")
SYSTEM_LAYER = "system-fa4"  # the overlay layered on top for --fa4 system|both
GEMMA4_LAYER = "gemma4-fa4"  # the overlay layered on top for --gemma4-fa4


def layers_for(overlay: str, fa4_mode: str, gemma4_fa4: bool) -> list[str]:
    return [overlay] + ([SYSTEM_LAYER] if fa4_mode != "bundled" else []) + ([GEMMA4_LAYER] if gemma4_fa4 else [])


def version_label(short: str, fa4_mode: str, gemma4_fa4: bool = False) -> str:
    """The PEP 440 local label of a forged wheel: fa4.<pin7>[.system|.both][.gemma4]."""
    label = f"fa4.{short}" if fa4_mode == "bundled" else f"fa4.{short}.{fa4_mode}"
    return label + (".gemma4" if gemma4_fa4 else "")


@dataclass(frozen=True)
class VllmPin:
    version: str
    wheel: str
    wheel_sha256: str
    sdist: str
    sdist_sha256: str
    flash_attention_commit: str  # the release's own (old) flash-attention pin
    overlay: str


@dataclass(frozen=True)
class WheelMirror:
    version: str
    wheel: str
    wheel_sha256: str
    cute_dir: str


@dataclass(frozen=True)
class Fa4Wheel:
    name: str
    upstream_version: str
    upstream_version_source: str
    requires: tuple[str, ...]
    requires_python: str
    license: str


@dataclass(frozen=True)
class FaPin:
    git_repository: str
    commit: str
    cute_tree_sha256: str
    cute_file_count: int
    commit_epoch: int
    requires: tuple[str, ...]
    tested_with: tuple[str, ...]  # the FA4 runtime versions measured on the H100
    wheel_mirror: WheelMirror
    fa4_wheel: Fa4Wheel

    @property
    def short(self) -> str:
        return self.commit[:7]


@dataclass(frozen=True)
class Pins:
    path: Path
    default_vllm: str
    index_project: str
    vllm: dict[str, VllmPin]
    fa: FaPin
    docker_images: tuple[str, str]  # default builder and runtime base images (docker/Dockerfile.in)

    def for_version(self, version: str) -> VllmPin:
        try:
            return self.vllm[version]
        except KeyError:
            known = ", ".join(sorted(self.vllm))
            raise ForgeError(
                f"unknown vLLM version {version!r}: {self.path.name} pins only {known}",
                "pick a pinned version, or add one to pins.json with its wheel sha256 "
                "and an overlay whose base hashes match",
            ) from None


def load_pins(path: Path | None = None) -> Pins:
    path = path or data_dir() / "pins.json"
    try:
        raw = json.loads(path.read_text())
        fa = raw["flash_attention"]
        return Pins(
            path=path,
            default_vllm=raw["default_vllm"],
            index_project=raw["index_project"],
            vllm={v: VllmPin(version=v, **spec) for v, spec in raw["vllm"].items()},
            fa=FaPin(
                git_repository=fa["git_repository"],
                commit=fa["commit"],
                cute_tree_sha256=fa["cute_tree_sha256"],
                cute_file_count=fa["cute_file_count"],
                commit_epoch=fa["commit_epoch"],
                requires=tuple(fa["requires"]),
                tested_with=tuple(fa["tested_with"]),
                wheel_mirror=WheelMirror(**fa["wheel_mirror"]),
                fa4_wheel=Fa4Wheel(**{**fa["fa4_wheel"], "requires": tuple(fa["fa4_wheel"]["requires"])}),
            ),
            docker_images=(raw["docker"]["builder_image"], raw["docker"]["runtime_image"]),
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ForgeError(f"cannot read pins file {path}: {e}", "reinstall vllm-forge") from e
