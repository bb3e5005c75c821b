"""The forged FA4 of a release compiles for SM90 without a GPU, with that release's own FA4 runtime
(scripts/fa4_compile_check.py: the exact packages of the series' GPU validation record)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fa4_compile_check.py"
spec = importlib.util.spec_from_file_location("fa4_compile_check", SCRIPT)
assert spec and spec.loader
fcc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fcc)


@pytest.mark.parametrize("version", ["0.22.1", "0.33.0"])  # cutlass-dsl 4.5.2 (the default tree) and 4.8.0
def test_series_compiles_for_sm90_without_a_gpu(version: str) -> None:
    r = fcc.check(version, fcc.CASES)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert [ln.split()[1] for ln in r.stdout.splitlines() if ln.startswith("ok ")] == [f"{c}:" for c in fcc.CASES]


def test_an_api_the_runtime_lacks_fails_the_check() -> None:
    """What the H100 once found at the first call (cutlass-dsl >= 4.6 has no cute.make_fragment) fails here."""
    def back_to_make_fragment(files: dict[str, bytes]) -> dict[str, bytes]:
        files["flash_fwd_sm90.py"] = files["flash_fwd_sm90.py"].replace(b"cute.make_rmem_tensor(", b"cute.make_fragment(")
        return files

    r = fcc.check("0.33.0", ["512:64:causal"], edit=back_to_make_fragment)
    assert r.returncode == 1
    assert "FAIL 512:64:causal: " in r.stdout and "make_fragment" in r.stdout, r.stdout
