"""`vllm-forge docker`: render docker/Dockerfile.in for a pinned release and, with --build, build it
with the first container engine that answers: docker (BuildKit), else buildah, else podman (the
same Dockerfile; buildah and podman need no daemon).

A build forges the wheel on this host first (sha256-checked inputs, the same bytes as in the
builder): its sha256 and its provenance stamp become labels, the builder refuses to continue
if its own wheel differs, and the verified base wheel is handed to the builder as the build
context `wheels` so that it is not downloaded twice. An FA4 kernel cache (`--fa4-cache`, made by
`vllm-forge fa4-cache` with the same forged wheel) is checked against its manifest and goes in as
the build context `fa4cache`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .assemble import dist_info_dir, forged_names, open_wheel
from .errors import ForgeError
from .fa4 import forged_label
from .output import parse_epoch, publish, staged_output
from .pins import BaseImage, DockerBase, data_dir, load_pins
from .verify import STAMP

ENGINES = ("docker", "buildah", "podman")


@dataclass(frozen=True)
class Rendered:
    dockerfile: Path
    wheel: str  # the forged wheel's file name
    base_wheel: str  # the upstream wheel's file name
    version: str  # the forged version, e.g. 0.19.1+fa4.bce2942
    base: DockerBase  # the release's CUDA bases (pins.json docker.bases), the Dockerfile's defaults


def render(version: str | None, out: Path, check: Callable[[Rendered], None] | None = None,
           platform: str = "x86_64") -> Rendered:
    """Render the Dockerfile into a temp file in out; `check` (e.g. of an FA4 kernel cache for it) runs
    before it is renamed into place, so that a refusal leaves nothing in out."""
    pins = load_pins()
    vpin = pins.for_version(version or pins.default_vllm, platform=platform)
    names = forged_names(vpin.wheel, forged_label(pins, vpin))
    wheel = names.filename
    forged_version = wheel.split("-")[1]
    base = pins.docker_base(vpin)
    builder, runtime = base.builder.ref, base.runtime.ref
    template = data_dir() / "docker" / "Dockerfile.in"
    try:
        text = template.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ForgeError(f"cannot read the Dockerfile template {template}: {e}",
                         "reinstall vllm-forge, or fix VLLM_FORGE_DATA_DIR") from None
    for key, value in {"VLLM_VERSION": vpin.version, "WHEEL": wheel, "BASE_WHEEL": vpin.wheel,
                       "MANIFEST": wheel[:-4] + ".manifest.json", "FORGED_VERSION": forged_version,
                       "PROVENANCE": wheel[:-4] + ".intoto.json", "SBOM": wheel[:-4] + ".cdx.json",
                       "CUDA": base.cuda, "BUILDER_IMAGE": builder, "RUNTIME_IMAGE": runtime,
                       "PLATFORM_OPTION": "" if vpin.platform == "x86_64" else f" --platform {vpin.platform}"}.items():
        text = text.replace(f"@{key}@", value)
    if re.search(r"@[A-Z_]+@", text):
        raise ForgeError("docker/Dockerfile.in has a placeholder no pin fills", "fix the template")
    rendered = Rendered(out / "Dockerfile", wheel, vpin.wheel, forged_version, base)
    with staged_output(out) as temp:
        staged = temp(".Dockerfile")
        staged.write_text(text)
        if check is not None:
            check(rendered)
        publish(staged, rendered.dockerfile)
    return rendered


def base_choice(base: DockerBase, version: str, builder_image: str | None = None,
                runtime_image: str | None = None) -> list[str]:
    """Lines saying which base images the build uses, why, and which are pinned by tag only."""
    lines = [f"base images for vLLM {version} on {base.platform}: CUDA {base.cuda} ({base.why})"]
    for role, pinned, override, flag in (("builder", base.builder, builder_image, "--builder-image"),
                                         ("runtime", base.runtime, runtime_image, "--runtime-image")):
        if override:
            chosen, whence = BaseImage(*override.split("@", 1)) if "@" in override else BaseImage(override, ""), flag
        else:
            chosen, whence = pinned, "pins.json docker.bases"
        lines.append(f"  {role}: {chosen.ref} (from {whence})" + (
            "" if chosen.digest else " -- unpinned: tag only, no digest known here; the registry may move it"))
    return lines


def engine_answers(name: str) -> bool:
    """`<engine> info` succeeds: docker's daemon answers; buildah/podman can open their storage."""
    exe = shutil.which(name)
    return bool(exe) and subprocess.run([exe, "info"], capture_output=True).returncode == 0  # type: ignore[list-item]


def engine_works() -> bool:
    return engine_answers("docker")


def pick_engine(requested: str = "auto", answers: Callable[[str], bool] | None = None) -> str | None:
    """The engine to build with: `requested` if it answers (else an error), or for "auto" the first
    of docker, buildah, podman that answers; None when none does."""
    answers = answers or engine_answers
    if requested != "auto":
        if requested not in ENGINES:
            raise ForgeError(f"unknown container engine {requested!r}", f"use one of auto, {', '.join(ENGINES)}")
        if not answers(requested):
            raise ForgeError(f"{requested} does not answer here (`{requested} info` fails)",
                             "start its daemon / install it, or use --engine auto")
        return requested
    return next((e for e in ENGINES if answers(e)), None)


@dataclass(frozen=True)
class ImageBuild:
    engine: str
    dockerfile: Path
    context: Path
    tag: str
    build_args: dict[str, str] = field(default_factory=dict)
    build_contexts: dict[str, Path] = field(default_factory=dict)
    secrets: dict[str, Path] = field(default_factory=dict)
    timestamp: int | None = None  # SOURCE_DATE_EPOCH of the image
    isolation: str | None = None  # buildah/podman: chroot where no container runtime can run
    platform: str = "x86_64"      # the image's machine: linux/amd64 or linux/arm64 (GH200)


def engine_command(b: ImageBuild) -> list[str]:
    """The build command line. docker: BuildKit (build contexts, secrets, SOURCE_DATE_EPOCH as a
    build arg, which BuildKit applies to the image's times); buildah/podman: OCI image format (their
    docker format records the build container's random id and hostname: a new digest every build),
    --timestamp for the created time and every file time in the new layers, --layers for one layer
    per instruction (as docker makes them; without it buildah commits a stage as one layer)."""
    cmd = [b.engine, "build"]
    if b.engine != "docker":
        cmd += ["--format", "oci", "--layers"]
        if b.isolation:
            cmd += ["--isolation", b.isolation]
        if b.timestamp is not None:
            cmd += ["--timestamp", str(b.timestamp)]
    args = dict(b.build_args)
    if b.timestamp is not None:
        args.setdefault("SOURCE_DATE_EPOCH", str(b.timestamp))
    if b.platform == "aarch64":  # (x86_64: the engine's own default, as before)
        cmd += ["--platform", "linux/arm64"]
    cmd += ["-f", str(b.dockerfile), "-t", b.tag]
    for key, value in sorted(args.items()):
        cmd += ["--build-arg", f"{key}={value}"]
    for name, path in sorted(b.build_contexts.items()):
        cmd += ["--build-context", f"{name}={path}"]
    for name, path in sorted(b.secrets.items()):
        cmd += ["--secret", f"id={name},src={path}"]
    return [*cmd, str(b.context)]


def git_provenance(context: Path) -> tuple[str, str, int | None]:
    """(source URL, revision, commit time) of the build context's git checkout; '' / None where
    unknown. A revision with uncommitted changes is suffixed -dirty."""
    def git(*args: str) -> str:
        r = subprocess.run(["git", "-C", str(context), *args], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""

    if not shutil.which("git"):
        return "", "", None
    revision = git("rev-parse", "HEAD")
    if revision and git("status", "--porcelain", "--untracked-files=normal"):
        revision += "-dirty"
    commit_time = git("log", "-1", "--format=%ct")
    return git("config", "--get", "remote.origin.url"), revision, int(commit_time) if commit_time else None


def wheel_stamp(wheel: Path) -> str:
    """The provenance stamp inside a forged wheel (dist-info/vllm_forge.json), as compact JSON."""
    with open_wheel(wheel, "forged wheel", "build it again") as z:
        name = f"{dist_info_dir(z, str(wheel))}/{STAMP}"
        try:
            return json.dumps(json.loads(z.text(name)), sort_keys=True, separators=(",", ":"))
        except ValueError as e:
            raise ForgeError(f"{name} in {wheel} is not JSON ({e})", "build it again") from None


def default_ca_bundle() -> Path | None:
    """The CA bundle this host's pip / Python is told to trust (PIP_CERT, SSL_CERT_FILE,
    REQUESTS_CA_BUNDLE), handed to the build as the secret `ca-bundle`."""
    for var in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
        value = os.environ.get(var)
        if value and Path(value).is_file():
            return Path(value)
    return None


def link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def docker(version: str | None, out: Path, build: bool, context: Path, tag: str | None,
           engine: str = "auto", builder_image: str | None = None, runtime_image: str | None = None,
           index_url: str | None = None, ca_bundle: Path | None = None, isolation: str | None = None,
           fa4_cache: Path | None = None, platform: str = "x86_64") -> Path:
    def check_fa4_cache(r: Rendered) -> None:
        if fa4_cache is not None:
            from .kernel_cache import check_cache

            made = check_cache(fa4_cache, r.version)
            print(f"FA4 kernel cache {fa4_cache}: {len(made['kernels'])} kernel(s) for {r.version}",
                  file=sys.stderr)

    env_epoch = os.environ.get("SOURCE_DATE_EPOCH")
    epoch = parse_epoch(env_epoch) if build and env_epoch else None  # refused before anything is written
    rendered = render(version, out, check_fa4_cache, platform)
    print(f"rendered {rendered.dockerfile}", file=sys.stderr)
    for line in base_choice(rendered.base, rendered.version, builder_image, runtime_image):
        print(line, file=sys.stderr)
    if not build:
        return rendered.dockerfile
    chosen = pick_engine(engine)
    if chosen is None:
        print("vllm-forge: no container engine answers here (`docker info`, `buildah info`, `podman info` "
              "fail); rendered only", file=sys.stderr)
        return rendered.dockerfile

    from .build import build as forge
    from .fetch import cache_dir

    # the host's forge: the wheel the builder must reproduce, bit for bit
    result = forge(version, out / "dist", index_url=index_url, platform=platform)
    manifest = json.loads(result.manifest.read_text())
    source, revision, _ = git_provenance(context)
    # the forged wheel's own time (the base wheel's, per release), not the checkout's commit time:
    # a new commit of vllm-forge must not change the dependency layer's file times
    timestamp = epoch if epoch is not None else int(manifest["source_date_epoch"])
    build_args = {
        "FORGED_WHEEL_SHA256": manifest["output"]["sha256"],
        "WHEEL_SOURCE_DATE_EPOCH": str(manifest["source_date_epoch"]),
        "VLLM_FORGE_STAMP": wheel_stamp(result.wheel),
        "VLLM_FORGE_REVISION": revision,
        "VLLM_FORGE_SOURCE": source,
    }
    if builder_image:
        build_args["BUILDER_IMAGE"] = builder_image
    if runtime_image:
        build_args["RUNTIME_IMAGE"] = runtime_image
    if index_url:
        build_args["PIP_INDEX_URL"] = index_url
    ca = ca_bundle or default_ca_bundle()
    if isolation is None and chosen != "docker" and not os.environ.get("BUILDAH_ISOLATION"):
        isolation = "chroot"  # runs where no OCI runtime can (no nested namespaces/cgroups needed)
    image_tag = tag or f"localhost/vllm-forge/vllm:{rendered.version.replace('+', '-')}"
    with tempfile.TemporaryDirectory(prefix="vllm-forge-wheels-", dir=out) as wheels, \
            tempfile.TemporaryDirectory(prefix="vllm-forge-fa4cache-", dir=out) as kernels:
        link_or_copy(cache_dir() / "dl" / rendered.base_wheel, Path(wheels) / rendered.base_wheel)
        contexts = {"wheels": Path(wheels)}
        if fa4_cache is not None:
            from .fetch import sha256_file
            from .kernel_cache import stage_cache
            from .kernel_cache_child import MANIFEST

            stage_cache(fa4_cache, Path(kernels))
            contexts["fa4cache"] = Path(kernels)
            build_args["FA4_CACHE_SHA256"] = sha256_file(Path(kernels) / MANIFEST)
        spec = ImageBuild(chosen, rendered.dockerfile, context, image_tag, build_args, contexts,
                          {"ca-bundle": ca} if ca else {}, timestamp, isolation, platform)
        cmd = engine_command(spec)
        when = datetime.fromtimestamp(timestamp, timezone.utc).isoformat()
        print(f"building {image_tag} with {chosen} (timestamp {timestamp} = {when}"
              f"{', CA bundle ' + str(ca) if ca else ''})", file=sys.stderr)
        before = scratch_containers(chosen)
        try:
            r = subprocess.run(cmd)
        finally:
            remove_leaked_containers(chosen, before)
    if r.returncode != 0:
        raise ForgeError(f"{chosen} build failed (exit {r.returncode})", "see the build output above")
    print(f"built {image_tag}", file=sys.stderr)
    layers = image_layers(chosen, image_tag)
    for line in layer_table(layers) if layers else [f"layers: see `{chosen} history {image_tag}`"]:
        print(line, file=sys.stderr)
    return rendered.dockerfile


@dataclass(frozen=True)
class Layer:
    diff_id: str  # sha256 of the uncompressed layer tar: what stays equal when the content does
    size: int  # bytes of that tar (-1 where the engine does not say)
    created_by: str


def image_layers(engine: str, tag: str) -> list[Layer]:
    """The image's layers, oldest first, from buildah's (or podman's: same storage) inspect output;
    [] for docker, whose layer sizes `docker history` shows."""
    if engine == "docker" or not shutil.which("buildah"):
        return []
    r = subprocess.run(["buildah", "inspect", "--type", "image", tag], capture_output=True, text=True)
    return parse_layers(json.loads(r.stdout)) if r.returncode == 0 else []


def parse_layers(info: dict[str, Any]) -> list[Layer]:
    """Layers from `buildah inspect --type image`: OCI config diff_ids + history, manifest sizes."""
    config = info["OCIv1"]
    manifest = json.loads(info["Manifest"]) if isinstance(info.get("Manifest"), str) else info.get("Manifest", {})
    sizes = [m.get("size", -1) for m in manifest.get("layers", [])]
    history = [h for h in config.get("history", []) if not h.get("empty_layer")]
    diff_ids = config["rootfs"]["diff_ids"]
    if len(sizes) != len(diff_ids):
        sizes = [-1] * len(diff_ids)
    by = [h.get("created_by", "") for h in history] if len(history) == len(diff_ids) else [""] * len(diff_ids)
    return [Layer(d, s, b) for d, s, b in zip(diff_ids, sizes, by, strict=True)]


def human(n: int) -> str:
    if n < 0:
        return "?"
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{n} B"
        size /= 1000
    return f"{n} B"


def layer_table(layers: list[Layer]) -> list[str]:
    lines = [f"layers ({len(layers)}, oldest first): diff_id, size, made by"]
    for layer in layers:
        what = " ".join(layer.created_by.split())
        what = re.sub(r"^/bin/sh -c #\(nop\) |^\|\d+ .*?/bin/sh -c |^/bin/sh -c ", "", what)
        what = re.sub(r"^(--mount=\S+ )+", "", what)  # RUN --mount=... flags: the command is what tells
        what = re.sub(r"^if \[ -s /run/secrets/ca-bundle \]; then .*?; fi && ", "", what)
        lines.append(f"  {layer.diff_id[:19]}  {human(layer.size):>9}  {what[:90]}")
    return lines


def scratch_containers(engine: str) -> set[str]:
    """buildah's working containers of `scratch` (buildah 1.28 leaves one behind per empty stage)."""
    if engine != "buildah":
        return set()
    r = subprocess.run(["buildah", "containers", "--format", "{{.ContainerID}} {{.ImageName}}"],
                       capture_output=True, text=True)
    return {ln.split()[0] for ln in r.stdout.splitlines() if ln.split()[1:] == ["scratch"]}


def remove_leaked_containers(engine: str, before: set[str]) -> None:
    leaked = sorted(scratch_containers(engine) - before)
    if leaked:
        subprocess.run(["buildah", "rm", *leaked], capture_output=True)
