"""`vllm-forge lock`: the runtime image's hash-pinned requirements for the real forged wheel,
resolved by pip against the package index; its hashes are the index's (checked by downloading a
small locked distribution with --require-hashes, and refused with a wrong hash)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli

from vllm_forge.build import BuildResult
from vllm_forge.fetch import sha256_file
from vllm_forge.lock import lock_lines
from vllm_forge.pins import Pins

pytestmark = pytest.mark.network

ENTRY = re.compile(r"^(\S+) \\\n    --hash=sha256:([0-9a-f]{64})$", re.M)


@pytest.fixture(scope="module")
def locked(forged: BuildResult, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("lock") / "requirements.txt"
    r = run_cli("lock", str(forged.wheel), "--out", str(out), "--wheel-ref", f"/dist/{forged.wheel.name}")
    assert r.returncode == 0, r.stderr
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
