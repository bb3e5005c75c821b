"""The image, built for real by `vllm-forge docker --build` with buildah (no daemon), on a Debian
bookworm base made here with debootstrap (no image registry is reachable, so not the nvidia/cuda
bases): the builder forges, verifies and locks; the runtime installs the wheel and its ~180 locked
dependencies with --require-hashes. Then, inside the image: vllm imports and reports the forged
version, `pip check` is clean, every installed vllm file has its RECORD hash, FA4 and the overlay
are there; the shipped wheel passes `vllm-forge verify` (its in-toto provenance statement included),
the SBOM lists the lock; the labels carry the provenance. The runtime layers: the locked dependencies,
the wheel, the FA4 cache. Re-forged (one file of the forge changed, the same dependencies): only the
wheel layers change. Built again from the same inputs: the same digest.

Selected with VLLM_FORGE_IMAGE_TEST=1 (root, buildah, debootstrap, ~10 GB of disk, PyPI and a
Debian mirror: about 25 min on 2 cores); CI deselects it (marker `image`). Results are printed
(-s) and written to $VLLM_FORGE_IMAGE_REPORT when set."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_cli

from vllm_forge.docker import git_provenance, parse_layers
from vllm_forge.assemble import forged_names
from vllm_forge.fa4 import forged_label
from vllm_forge.pins import Pins, load_pins
from vllm_forge.verify import STAMP

pytestmark = [pytest.mark.image, pytest.mark.network]

BASE = os.environ.get("VLLM_FORGE_IMAGE_BASE", "localhost/vllm-forge-base:bookworm")
MIRROR = os.environ.get("VLLM_FORGE_DEBIAN_MIRROR", "http://deb.debian.org/debian")
TAG = "localhost/vllm-forge/vllm:image-test"
_PINS = load_pins()
_VPIN = _PINS.for_version(_PINS.default_vllm)
WHEEL = forged_names(_VPIN.wheel, forged_label(_PINS, _VPIN)).filename  # what `docker` renders and builds
FORGED = WHEEL.split("-")[1]  # 0.19.1+fa4.bce2942.p952cdd5[.gemma4]
REPORT: dict[str, object] = {}
REPO = Path(__file__).resolve().parents[1]


def buildah(*args: str, check: bool = True) -> str:
    r = subprocess.run(["buildah", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"buildah {' '.join(args)}: {r.stderr}")
    return r.stdout.strip()


def image_exists(ref: str) -> bool:
    return subprocess.run(["buildah", "inspect", "--type", "image", ref], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def base_image() -> str:
    """A Debian bookworm root filesystem (python3.11, venv, pip, CA certificates, git) from Debian's
    packages, committed as a local image: the stand-in for the nvidia/cuda bases."""
    if os.geteuid() != 0 or not shutil.which("buildah") or not shutil.which("debootstrap"):
        pytest.skip("needs root, buildah and debootstrap (apt-get install buildah debootstrap)")
    if image_exists(BASE):
        return BASE
    with tempfile.TemporaryDirectory(prefix="vllm-forge-rootfs-", dir="/var/tmp") as tmp:
        root = Path(tmp) / "root"
        subprocess.run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,python3-pip,"
                        "ca-certificates,git", "bookworm", str(root), MIRROR], check=True, capture_output=True)
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for f in (root / junk).glob("*"):
                if f.is_file():
                    f.unlink()
        ctr = buildah("from", "scratch")
        try:
            mnt = buildah("mount", ctr)
            tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
            subprocess.run(["tar", "-C", mnt, "-x", "--numeric-owner"], stdin=tar.stdout, check=True)
            assert tar.wait() == 0
            buildah("umount", ctr)
            buildah("config", "--cmd", "/bin/bash", ctr)
            buildah("commit", ctr, BASE)
        finally:
            buildah("rm", ctr, check=False)
    return BASE


def build(tag: str, out: Path, context: Path = REPO, env: dict[str, str] | None = None) -> dict[str, object]:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "vllm_forge.cli", "docker", "--build", "--engine", "buildah",
                        "--builder-image", BASE, "--runtime-image", BASE, "--tag", tag, "--out", str(out),
                        "--context", str(context)], capture_output=True, text=True, timeout=3600,
                       env={**os.environ, **(env or {})})
    assert r.returncode == 0, r.stderr[-4000:] + r.stdout[-4000:]
    info = json.loads(buildah("inspect", "--type", "image", tag))
    layers = [{"diff_id": la.diff_id, "size": la.size, "created_by": " ".join(la.created_by.split())[-120:]}
              for la in parse_layers(info)]
    table = r.stderr[r.stderr.index("layers ("):] if "layers (" in r.stderr else ""
    return {"seconds": round(time.monotonic() - t0), "id": info["FromImageID"],
            "digest": info["FromImageDigest"], "layers": layers, "layer_table": table.splitlines()}


def remove_image(tag: str) -> None:
    """The image and the intermediate images of --layers (the layer cache: a later build must not
    reuse them, so that it shows what the build makes, and the disk needs the room)."""
    buildah("rmi", tag, check=False)
    buildah("rmi", "--prune", check=False)


@pytest.fixture(scope="module")
def image(base_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    out = tmp_path_factory.mktemp("image-out")
    REPORT["build1"] = build(TAG, out)
    yield TAG
    report = os.environ.get("VLLM_FORGE_IMAGE_REPORT")
    if report:
        Path(report).write_text(json.dumps(REPORT, indent=2) + "\n")
    print(json.dumps({k: v for k, v in REPORT.items()}, indent=2))


@pytest.fixture(scope="module")
def container(image: str) -> Iterator[str]:
    ctr = buildah("from", "--pull-never", image)
    yield ctr
    buildah("rm", ctr, check=False)


def run_in(ctr: str, script: str) -> str:
    r = subprocess.run(["buildah", "run", "--isolation", "chroot", ctr, "--", "bash", "-c", script],
                       capture_output=True, text=True)
    assert r.returncode == 0, f"{script}\n{r.stdout}\n{r.stderr}"
    return r.stdout


def test_vllm_imports_and_reports_the_forged_version(container: str) -> None:
    """`import vllm` works without a GPU. The installed distribution is the forged one; vLLM's own
    `__version__` comes from `vllm/_version.py` (setuptools-scm, written when upstream built the
    wheel), which the forge leaves byte-identical: it says 0.19.1."""
    out = run_in(container, "cd / && python -c 'import vllm, importlib.metadata as m; "
                            "print(vllm.__version__); print(m.version(\"vllm\")); print(vllm.__file__)'")
    version, dist_version, path = out.strip().splitlines()[-3:]
    assert dist_version == FORGED and FORGED.startswith("0.19.1+fa4.bce2942.p952cdd5") and version == "0.19.1", out
    assert path.startswith("/opt/vllm/lib/python3") and path.endswith("/site-packages/vllm/__init__.py")
    REPORT["vllm.__version__"] = version
    REPORT["importlib.metadata.version('vllm')"] = dist_version


def test_pip_check_is_clean(container: str) -> None:
    out = run_in(container, "pip check && pip list --format=freeze | wc -l")
    assert "No broken requirements found." in out
    REPORT["installed distributions"] = int(out.strip().splitlines()[-1])


CHECK_INSTALL = r"""
import base64, csv, hashlib, json, pathlib, sys
from importlib import metadata
dist = metadata.distribution("vllm")
root = pathlib.Path(dist.locate_file(""))
bad, n = [], 0
for path, digest, _ in csv.reader(dist.read_text("RECORD").splitlines()):
    if not digest or path.endswith((".pyc",)) or "__pycache__" in path:
        continue
    algo, want = digest.split("=", 1)
    got = base64.urlsafe_b64encode(hashlib.new(algo, (root / path).read_bytes()).digest()).rstrip(b"=").decode()
    n += 1
    if got != want:
        bad.append(path)
cute = sorted(p.name for p in (root / "vllm/vllm_flash_attn/cute").rglob("*.py"))
stamp = json.loads(dist.read_text("vllm_forge.json"))
overlay = {p: (root / p).is_file() for p in stamp["overlay"]["files"]}
print(json.dumps({"checked": n, "bad": bad, "cute": len(cute), "stamp": stamp, "overlay": overlay}))
"""


def test_installed_files_fa4_and_overlay(container: str, pins: Pins) -> None:
    got = json.loads(run_in(container, f"python - <<'EOF'\n{CHECK_INSTALL}\nEOF").strip().splitlines()[-1])
    assert got["bad"] == [] and got["checked"] > 2000, got["bad"][:5]
    assert got["cute"] >= pins.fa.cute_file_count
    assert got["overlay"] and all(got["overlay"].values()), got["overlay"]
    assert got["stamp"]["flash_attention"]["commit"] == pins.fa.commit
    REPORT["installed vllm files hash-checked against RECORD"] = got["checked"]


def test_shipped_wheel_verifies_and_labels_carry_provenance(image: str, container: str) -> None:
    mnt = buildah("mount", container)
    try:
        wheel = Path(mnt) / "dist" / WHEEL
        r = run_cli("verify", str(wheel))
        last = r.stdout.strip().splitlines()[-1]
        assert r.returncode == 0 and last.startswith(f"{WHEEL}: verified"), r.stdout + r.stderr
        manifest = json.loads((Path(mnt) / "dist" / (WHEEL[:-4] + ".manifest.json")).read_text())
        import hashlib
        sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
        lock = (Path(mnt) / "dist" / "requirements.txt").read_text()
        statement = json.loads((Path(mnt) / "dist" / (WHEEL[:-4] + ".intoto.json")).read_text())
        sbom = json.loads((Path(mnt) / "dist" / (WHEEL[:-4] + ".cdx.json")).read_text())
        deps_lock = (Path(mnt) / "dist" / "dependencies.txt").read_text()
        stamp_file = next((Path(mnt) / "opt/vllm/lib").glob(f"python3*/site-packages/vllm-*.dist-info/{STAMP}"))
        stamp = json.loads(stamp_file.read_text())
    finally:
        buildah("umount", container, check=False)
    labels = json.loads(buildah("inspect", "--type", "image", image))["OCIv1"]["config"]["Labels"]
    assert labels["io.vllm-forge.wheel.sha256"] == sha == manifest["output"]["sha256"]
    assert f"/dist/{WHEEL} \\\n    --hash=sha256:{sha}" in lock
    assert json.loads(labels["io.vllm-forge.stamp"]) == stamp
    assert any(ln.startswith("ok: provenance ") for ln in r.stdout.splitlines())
    assert statement["subject"] == [{"name": WHEEL, "digest": {"sha256": sha}}]
    assert labels["io.vllm-forge.provenance"] == f"/dist/{WHEEL[:-4]}.intoto.json"
    assert labels["io.vllm-forge.sbom"] == f"/dist/{WHEEL[:-4]}.cdx.json"
    assert sbom["metadata"]["component"]["hashes"] == [{"alg": "SHA-256", "content": sha}]
    assert len(sbom["components"]) == deps_lock.count("--hash=sha256:") == lock.count("--hash=sha256:") - 1
    REPORT["sbom components"] = len(sbom["components"])
    assert labels["org.opencontainers.image.version"] == FORGED
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert labels["org.opencontainers.image.revision"] in (head, head + "-dirty")
    assert labels["org.opencontainers.image.source"] == git_provenance(REPO)[0]
    assert labels["org.opencontainers.image.base.name"] == BASE
    REPORT["labels"] = labels
    REPORT["shipped wheel"] = {"sha256": sha, "verify": r.stdout.strip().splitlines()}


# the runtime stage's last layers: dependencies.txt, the dependencies, /dist (wheel, manifest,
# provenance, lock, SBOM), the wheel installed, the FA4 cache; before them the base and the
# ensurepip-check RUN (base0, base1, ...)
RUNTIME_LAYERS = ("deps-lock", "deps", "dist", "wheel", "fa4-cache")
WHEEL_LAYERS = {"dist", "wheel"}


def named(layers: list[dict[str, object]]) -> dict[str, dict[str, object]]:
    n = len(RUNTIME_LAYERS)
    assert len(layers) > n
    return {**{f"base{i}": la for i, la in enumerate(layers[:-n])}, **dict(zip(RUNTIME_LAYERS, layers[-n:]))}


def test_image_size_and_layers(image: str) -> None:
    first = REPORT["build1"]
    assert isinstance(first, dict)
    layers = named(first["layers"])
    size = {k: int(v["size"]) for k, v in layers.items()}  # type: ignore[call-overload]
    assert size["deps"] > 5e9  # torch, the CUDA wheels, ...: by far the largest
    assert size["dist"] < 1e9 and size["wheel"] < 3e9 and size["deps-lock"] < 1e5 and size["fa4-cache"] < 1e5
    assert "/dist/dependencies.txt" in str(layers["deps"]["created_by"])
    REPORT["size"] = buildah("images", "--format", "{{.Size}}", image)


def test_reforge_changes_only_the_wheel_layers(image: str, container: str, tmp_path: Path) -> None:
    """One file of the forge changed (the runtime layer module that goes into the wheel: a new
    wheel, the same dependencies), built from a copy of the checkout: the base, the dependency lock
    and the dependency layer keep their digests; the /dist and installed-wheel layers change; the
    FA4 cache layer (none here: an empty directory) stays."""
    first = REPORT["build1"]
    assert isinstance(first, dict)
    buildah("rm", container)
    remove_image(image)
    copy = tmp_path / "checkout"
    files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard", "-z"],
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        if (REPO / rel).is_file():
            (copy / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, copy / rel)
    runtime = copy / "vllm_overlay" / "runtime" / "_forge_runtime.py"
    runtime.write_text(runtime.read_text() + "\n# re-forged: one changed line\n")
    again = build(TAG + "-reforged", tmp_path / "out", copy, {"VLLM_FORGE_DATA_DIR": str(copy)})
    REPORT["build2 (re-forged)"] = again
    a, b = named(first["layers"]), named(again["layers"])  # type: ignore[arg-type]
    changed = {k for k in a if a[k]["diff_id"] != b[k]["diff_id"]}
    REPORT["layers changed by the re-forge"] = sorted(changed)
    assert changed == WHEEL_LAYERS, changed
    assert again["id"] != first["id"]
    remove_image(TAG + "-reforged")


def test_second_build_gives_the_same_digest(image: str, tmp_path: Path) -> None:
    """Runs last: the earlier images are removed first (each build needs ~12 GB for the image and
    as much again while buildah commits its layer), their digests kept."""
    remove_image(image)
    again = build(TAG + "-again", tmp_path / "out")
    REPORT["build3 (same inputs as build1)"] = again
    first = REPORT["build1"]
    assert isinstance(first, dict)
    assert again["layers"] == first["layers"]
    assert again["id"] == first["id"], (first, again)
    assert again["digest"] == first["digest"]
