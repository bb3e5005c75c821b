"""Stage 1, resolve: the pinned inputs for a vLLM version, read from pins.json."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
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


PLATFORMS = ("x86_64", "aarch64")  # `--platform`: the release wheel's machine (aarch64: GH200)
USER_PINS = "pins.json"  # `vllm-forge pin`'s releases, in the user data directory (validation.user_data_dir)

FA4_MODES = ("bundled", "system", "both")
SYSTEM_LAYER = "system-fa4"  # the overlay layered on top for --fa4 system|both
GEMMA4_LAYER = "gemma4-fa4"  # Gemma-4 on FA4 where the release forces TRITON_ATTN (default; --no-gemma4-fa4)


def layers_for(overlay: str, fa4_mode: str, gemma4_fa4: bool) -> list[str]:
    """The overlay stack: the backport overlay (none for a tune release), system FA4, Gemma-4."""
    return (([overlay] if overlay else []) + ([SYSTEM_LAYER] if fa4_mode != "bundled" else [])
            + ([GEMMA4_LAYER] if gemma4_fa4 else []))


PLANS = ("backport", "tune")


def version_label(short: str, fa4_mode: str, gemma4_fa4: bool = False, series: str = "",
                  runtime: bool = True, user: str = "") -> str:
    """The PEP 440 local label of a forged wheel: fa4.<pin7>[.p<series7>][.system|.both][.gemma4][.u<user7>][.nort].

    series: the short hash of the flash-attention patch series (patching.series_hash), so a
    build with another series or pin never gets the name of the default one; .nort: built
    without the runtime layer (--no-runtime); user: the short hash of the user's own vLLM patches (--patches)."""
    label = f"fa4.{short}" + (f".p{series}" if series else "")
    label += "" if fa4_mode == "bundled" else f".{fa4_mode}"
    return label + (".gemma4" if gemma4_fa4 else "") + (f".u{user}" if user else "") + ("" if runtime else ".nort")


@dataclass(frozen=True)
class VllmPin:
    version: str
    wheel: str
    wheel_sha256: str
    sdist: str
    sdist_sha256: str
    flash_attention_commit: str  # the release's own flash-attention pin
    plan: str                    # backport: overlay + pins.json's FA pin; tune: its own FA pin + series
    cute_tree_sha256: str = ""   # the release wheel's own vllm/vllm_flash_attn/cute tree (tree_sha256)
    cute_file_count: int = 0
    wheel_choice: str = ""       # why this wheel of the release (build tags, platforms)
    overlay: str = ""            # backport only
    torch: str = ""
    fa4_requires: tuple[str, ...] = ()   # requirements/cuda.txt's FA4 runtime lines (informational)
    refused: str = ""            # a release that cannot be served: why
    platforms: dict[str, dict[str, object]] = field(default_factory=dict, hash=False, compare=False)
    platform: str = "x86_64"     # whose wheel `wheel` is (for_version picks it)
    user: bool = False           # pinned by `vllm-forge pin` into the user data directory

    @property
    def fa_short(self) -> str:
        return self.flash_attention_commit[:7]


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
class BaseImage:
    image: str   # name:tag
    digest: str  # sha256:<64 hex>, or "" where none is known (pinned by tag only)

    @property
    def ref(self) -> str:
        """What FROM gets: name:tag@digest where a digest is known, else name:tag."""
        return f"{self.image}@{self.digest}" if self.digest else self.image


@dataclass(frozen=True)
class DockerBase:
    """The CUDA bases of the image for the releases `vllm` (a version specifier) on `platform`."""
    vllm: str
    platform: str  # the machine of the pinned wheel's platform tag: x86_64, aarch64
    cuda: str
    builder: BaseImage
    runtime: BaseImage
    why: str = ""


def wheel_platform(wheel: str) -> str:
    """The machine of a wheel file name's platform tag (manylinux_2_31_x86_64 -> x86_64)."""
    from packaging.utils import parse_wheel_filename

    machines = {t.platform.split("_", 3)[-1] if t.platform.startswith("manylinux_") else t.platform.split("_", 1)[-1]
                for t in parse_wheel_filename(wheel)[3]}
    return machines.pop() if len(machines) == 1 else ""


@dataclass(frozen=True)
class Pins:
    path: Path
    default_vllm: str
    index_project: str
    vllm: dict[str, VllmPin]
    fa: FaPin
    docker_bases: tuple[DockerBase, ...]  # the image's base images per release and platform

    def for_version(self, version: str, servable: bool = True, platform: str = "x86_64") -> VllmPin:
        try:
            vpin = self.vllm[version]
        except KeyError:
            known = ", ".join(sorted(self.vllm, key=version_key))
            raise ForgeError(
                f"unknown vLLM version {version!r}: {self.path.name} pins only {known}",
                f"pick a pinned version, or pin that release with `vllm-forge pin {version}`",
            ) from None
        if platform not in PLATFORMS:
            raise ForgeError(f"unknown --platform {platform!r}", f"use one of {', '.join(PLATFORMS)}")
        if platform != "x86_64":
            vpin = self._on(vpin, platform)
        if servable and vpin.refused:
            raise ForgeError(f"vLLM {version} cannot be forged: {vpin.refused}", "pick another release")
        return vpin

    @staticmethod
    def _on(vpin: VllmPin, platform: str) -> VllmPin:
        """vpin with its `platform` wheel: the x86_64 plan applies unchanged only where every .py file of
        the two wheels is identical (their RECORD sha256s; pin data: python_differs), else refused."""
        spec = vpin.platforms.get(platform)
        if spec is None:
            raise ForgeError(f"vLLM {vpin.version} has no {platform} wheel in the release data",
                             f"pin it with `vllm-forge pin {vpin.version}` (it records every platform's wheel)")
        differs = spec.get("python_differs") or []
        assert isinstance(differs, list)
        shown = ", ".join(map(str, differs[:3])) + (", ..." if len(differs) > 3 else "")
        refused = vpin.refused or (f"{len(differs)} Python file(s) of its {platform} wheel differ from the x86_64 "
                                   f"wheel's ({shown}): the plan is checked on x86_64's" if differs else "")
        return dataclasses.replace(vpin, wheel=str(spec["wheel"]), wheel_sha256=str(spec["wheel_sha256"]),
                                   wheel_choice=str(spec.get("wheel_choice", "")), platform=platform,
                                   refused=refused)

    def docker_base(self, vpin: VllmPin) -> DockerBase:
        """The CUDA bases for vpin's release on its wheel's platform (exactly one row matches)."""
        from packaging.specifiers import SpecifierSet

        platform = wheel_platform(vpin.wheel)
        rows = [b for b in self.docker_bases if b.platform == platform and vpin.version in SpecifierSet(b.vllm)]
        if len(rows) != 1:
            raise ForgeError(f"pins.json has {len(rows)} docker base rows for vLLM {vpin.version} on {platform or '?'}",
                             "give that release and platform exactly one row in pins.json's docker.bases")
        return rows[0]

    def fa_commit(self, vpin: VllmPin) -> str:
        """The flash-attention commit whose FA4 the forged wheel of vpin carries."""
        return self.fa.commit if vpin.plan == "backport" else vpin.flash_attention_commit


def version_key(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split(".") if x.isdigit())


_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_IMAGE = re.compile(r"^[a-z0-9][a-z0-9._/:-]*:[A-Za-z0-9_][A-Za-z0-9_.-]*$")  # registry/name:tag
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")  # a plain file name: no directories, no '..'


def _check(pins: Pins) -> None:
    """Values pins.json feeds into paths, URLs and comparisons have the shapes they must have."""
    for v, vp in pins.vllm.items():
        for what, value, shape in (("wheel", vp.wheel, _FILE), ("sdist", vp.sdist, _FILE),
                                   ("wheel_sha256", vp.wheel_sha256, _SHA256),
                                   ("sdist_sha256", vp.sdist_sha256, _SHA256)):
            if not isinstance(value, str) or not shape.match(value):
                raise ValueError(f"vllm {v!r}: {what} {value!r} is not a {'file name' if shape is _FILE else 'sha256'}")
        for plat, spec in vp.platforms.items():
            if plat not in PLATFORMS or not isinstance(spec, dict) or not _FILE.match(str(spec.get("wheel"))) \
                    or not _SHA256.match(str(spec.get("wheel_sha256"))):
                raise ValueError(f"vllm {v!r}: platforms.{plat} needs a wheel file name and its sha256")
        if vp.plan not in PLANS:
            raise ValueError(f"vllm {v!r}: plan {vp.plan!r} is not one of {', '.join(PLANS)}")
        if vp.plan == "backport" and (not isinstance(vp.overlay, str) or not vp.overlay):
            raise ValueError(f"vllm {v!r}: overlay {vp.overlay!r} is not an overlay id")
        if vp.plan == "tune" and (not isinstance(vp.cute_tree_sha256, str) or not _SHA256.match(vp.cute_tree_sha256)
                                  or not _COMMIT.match(vp.flash_attention_commit)):
            raise ValueError(f"vllm {v!r}: a tune plan needs its FA commit and cute_tree_sha256")
    wm = pins.fa.wheel_mirror
    checks = (("flash_attention.commit", pins.fa.commit, _COMMIT),
              ("flash_attention.cute_tree_sha256", pins.fa.cute_tree_sha256, _SHA256),
              ("wheel_mirror.wheel", wm.wheel, _FILE), ("wheel_mirror.wheel_sha256", wm.wheel_sha256, _SHA256),
              ("index_project", pins.index_project, _FILE))
    for what, value, shape in checks:
        if not isinstance(value, str) or not shape.match(value):
            raise ValueError(f"{what} {value!r} does not have the shape it must have")
    for b in pins.docker_bases:
        for img in (b.builder, b.runtime):
            bad_digest = bool(img.digest) and not _DIGEST.match(img.digest)
            if not isinstance(img.image, str) or not _IMAGE.match(img.image) or bad_digest:
                raise ValueError(f"docker base {img.image!r}@{img.digest!r} is not an image name:tag "
                                 "(and sha256 digest)")
    for vp in pins.vllm.values():
        try:
            pins.docker_base(vp)  # every pinned release has its bases
        except ForgeError as e:
            raise ValueError(e.what) from None
    if pins.default_vllm not in pins.vllm:
        raise ValueError(f"default_vllm {pins.default_vllm!r} is not pinned")


def _user_releases() -> dict[str, object]:
    """`vllm-forge pin`'s entries (user data directory), layered over the shipped ones."""
    from .validation import user_data_dir

    path = user_data_dir() / USER_PINS
    if not path.is_file():
        return {}
    try:
        user = json.loads(path.read_text())["vllm"]
        if not isinstance(user, dict):
            raise TypeError("vllm is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ForgeError(f"cannot read the user pins {path}: {type(e).__name__}: {e}",
                         "fix or remove it (`vllm-forge pin` writes it), or set VLLM_FORGE_USER_DATA_DIR") from None
    return {v: {**spec, "user": True} for v, spec in user.items() if isinstance(spec, dict)}


def load_pins(path: Path | None = None) -> Pins:
    layered = path is None
    path = path or data_dir() / "pins.json"
    try:
        raw = json.loads(path.read_text())
        if layered:
            raw["vllm"] = {**raw["vllm"], **_user_releases()}
        fa = raw["flash_attention"]
        pins = Pins(
            path=path,
            default_vllm=raw["default_vllm"],
            index_project=raw["index_project"],
            vllm={v: VllmPin(version=v, **{**spec, "fa4_requires": tuple(spec.get("fa4_requires", ()))})
                  for v, spec in raw["vllm"].items()},
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
            docker_bases=tuple(DockerBase(**{**b, "builder": BaseImage(**b["builder"]),
                                              "runtime": BaseImage(**b["runtime"])})
                               for b in raw["docker"]["bases"]),
        )
        _check(pins)
        return pins
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        from .validation import user_data_dir

        user = user_data_dir() / USER_PINS
        mine = layered and user.is_file()
        raise ForgeError(f"cannot read pins file {path}" + (f" with the user pins {user}" if mine else "")
                         + f": {type(e).__name__}: {e}",
                         "reinstall vllm-forge, or fix the copy VLLM_FORGE_DATA_DIR points at"
                         + (f"; or remove {user} (`vllm-forge pin` writes it)" if mine else "")) from None
