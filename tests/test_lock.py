"""`vllm-forge lock`: the runtime image's hash-pinned requirements for the real forged wheel,
resolved by pip against the package index; its hashes are the index's (checked by downloading a
small locked distribution with --require-hashes, and refused with a wrong hash)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cli

from vllm_forge.build import BuildResult
from vllm_forge.fetch import sha256_file
from vllm_forge.lock import lock_lines
from vllm_forge.pins import Pins
from vllm_forge.sbom import sbom_json

pytestmark = pytest.mark.network

ENTRY = re.compile(r"^(\S+) \\\n    --hash=sha256:([0-9a-f]{64})$", re.M)


@pytest.fixture(scope="module")
def lock_dir(forged: BuildResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lock")
    r = run_cli("lock", str(forged.wheel), "--out", str(out / "requirements.txt"), "--wheel-ref",
                f"/dist/{forged.wheel.name}", "--dependencies-out", str(out / "dependencies.txt"),
                "--sbom-out", str(out / "sbom.cdx.json"))
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def locked(lock_dir: Path) -> dict[str, str]:
    out = lock_dir / "requirements.txt"
    text = out.read_text()
    entries = dict(ENTRY.findall(text))
    body = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert len(body) == 2 * len(entries)  # every requirement has exactly one hash line
    return entries


def test_lock_pins_everything(locked: dict[str, str], forged: BuildResult, pins: Pins) -> None:
    assert locked[f"/dist/{forged.wheel.name}"] == sha256_file(forged.wheel)
    reqs = [r for r in locked if not r.startswith("/")]
    assert len(reqs) > 100 and all(re.fullmatch(r"[a-z0-9-]+==\S+", r) for r in reqs), reqs
    assert "torch==2.10.0" in locked  # vLLM 0.19.1's own pin
    for tested in pins.fa.tested_with:  # FA4's runtime at the versions measured on the H100
        assert tested in locked, tested


def test_dependencies_lock_and_sbom(locked: dict[str, str], lock_dir: Path, forged: BuildResult) -> None:
    """The dependencies-only lock (the image's first layer) is the full lock without the wheel; the
    CycloneDX SBOM names the wheel (its sha256) and every locked distribution with its hash."""
    deps = dict(ENTRY.findall((lock_dir / "dependencies.txt").read_text()))
    wheel_ref = f"/dist/{forged.wheel.name}"
    assert deps == {k: v for k, v in locked.items() if k != wheel_ref} and wheel_ref in locked
    bom = json.loads((lock_dir / "sbom.cdx.json").read_text())
    assert bom["bomFormat"] == "CycloneDX" and bom["specVersion"] == "1.6"
    subject = bom["metadata"]["component"]
    assert subject["name"] == "vllm" and subject["version"] == forged.wheel.name.split("-")[1]
    assert subject["hashes"] == [{"alg": "SHA-256", "content": sha256_file(forged.wheel)}]
    assert subject["purl"].endswith("?file_name=" + forged.wheel.name.replace("+", "%2B"))
    comps = {f"{c['name']}=={c['version']}": c for c in bom["components"]}
    assert set(comps) == set(deps)
    for req, sha in deps.items():
        assert comps[req]["hashes"] == [{"alg": "SHA-256", "content": sha}]
        assert comps[req]["purl"] == f"pkg:pypi/{req.replace('==', '@')}"
    root = next(d for d in bom["dependencies"] if d["ref"] == subject["bom-ref"])
    assert sorted(root["dependsOn"]) == sorted(c["bom-ref"] for c in comps.values())
    # reproducible: the same lock gives the same bytes (no clock time, no random serial number)
    epoch = json.loads(forged.manifest.read_text())["source_date_epoch"]
    assert bom["metadata"]["timestamp"].startswith(time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch)))
    triples = [(*r.split("=="), h) for r, h in deps.items()]
    assert sbom_json(forged.wheel.name, sha256_file(forged.wheel), triples, epoch) == \
        (lock_dir / "sbom.cdx.json").read_text()


def test_locked_hashes_are_the_index_files(locked: dict[str, str], tmp_path: Path) -> None:
    name = "einops"  # small, pure Python, locked through FA4's requirements
    req = next(r for r in locked if r.startswith(f"{name}=="))
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text(f"{req} --hash=sha256:{locked[req]}\n")
    bad.write_text(f"{req} --hash=sha256:{'0' * 64}\n")
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "-d", str(tmp_path / "d")]
    ok = subprocess.run([*pip, "-r", str(good)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    refused = subprocess.run([*pip, "-r", str(bad)], capture_output=True, text=True)
    assert refused.returncode != 0 and "DO NOT MATCH THE HASHES" in refused.stderr


def test_unhashable_distribution_is_refused(tmp_path: Path) -> None:
    wheel = tmp_path / "vllm-0.19.1-py3-none-any.whl"
    wheel.write_bytes(b"x")
    items = [{"metadata": {"name": "vllm", "version": "0.19.1"}, "download_info": {}},
             {"metadata": {"name": "somepkg", "version": "1.0"}, "download_info": {"url": "file:///src/somepkg"}}]
    from vllm_forge.errors import ForgeError
    with pytest.raises(ForgeError, match="somepkg 1.0 comes from file:///src/somepkg, which has no sha256"):
        lock_lines(wheel, items, str(wheel))
