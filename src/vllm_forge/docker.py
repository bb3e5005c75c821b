"""`vllm-forge docker`: render docker/Dockerfile.in for a pinned release and, where a container
engine answers, build it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from .assemble import forged_names
from .errors import ForgeError
from .fa4 import forged_label
from .output import publish, staged_output
from .pins import data_dir, load_pins


def render(version: str | None, out: Path) -> Path:
    pins = load_pins()
    vpin = pins.for_version(version or pins.default_vllm)
    wheel = forged_names(vpin.wheel, forged_label(pins, vpin)).filename
    cuda = pins.cuda_image_tag
    template = data_dir() / "docker" / "Dockerfile.in"
    try:
        text = template.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ForgeError(f"cannot read the Dockerfile template {template}: {e}",
                         "reinstall vllm-forge, or fix VLLM_FORGE_DATA_DIR") from None
    for key, value in {"VLLM_VERSION": vpin.version, "WHEEL": wheel, "CUDA_IMAGE_TAG": cuda}.items():
        text = text.replace(f"@{key}@", value)
    if "@" in "".join(ln for ln in text.splitlines() if not ln.startswith("#")):
        raise ForgeError("docker/Dockerfile.in has a placeholder no pin fills", "fix the template")
    dockerfile = out / "Dockerfile"
    with staged_output(out) as temp:
        staged = temp(".Dockerfile")
        staged.write_text(text)
        publish(staged, dockerfile)
    return dockerfile


def engine_works() -> bool:
    docker = shutil.which("docker")
    return bool(docker) and subprocess.run([docker, "info"], capture_output=True).returncode == 0  # type: ignore[list-item]


def docker(version: str | None, out: Path, build: bool, context: Path, tag: str | None) -> Path:
    dockerfile = render(version, out)
    print(f"rendered {dockerfile}", file=sys.stderr)
    if build:
        if not engine_works():
            print("vllm-forge: no container engine answers here (`docker info` fails); rendered only",
                  file=sys.stderr)
        else:
            cmd = ["docker", "build", "-f", str(dockerfile), "-t", tag or "vllm-forge/vllm:latest", str(context)]
            if subprocess.run(cmd).returncode != 0:
                raise ForgeError(f"docker build failed: {' '.join(cmd)}", "see the build output above")
    return dockerfile
