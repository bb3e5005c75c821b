"""The runtime layer shipped in forged wheels (vllm_overlay/runtime/_forge_runtime.py): its pure
decisions, and its presence in a real forged wheel."""

from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path

from vllm_forge.runtime import add_entry_point, has_entry_point

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("_forge_runtime", REPO / "vllm_overlay" / "runtime" / "_forge_runtime.py")
rt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rt)  # type: ignore[union-attr]


def test_page64_block_size_gemma4_layout() -> None:
    # Gemma-4-31B: sliding head 256 x 16 kv heads, global head 512 x 4 kv heads (bytes per token, K+V bf16)
    per_token = {"sliding": 2 * 16 * 256 * 2, "global": 2 * 4 * 512 * 2}
    assert rt.page64_block_size(per_token, {"global"}) == 32
    assert rt.page64_block_size({"global": 8192}, {"global"}) == 64
    assert rt.page64_block_size({"s": 8 * 8192, "global": 8192}, {"global"}) is None  # would need 8
    assert rt.page64_block_size(per_token, set()) is None


def test_cache_key_changes_with_gpu_and_torch() -> None:
    base = rt.device_key("NVIDIA H100 80GB HBM3", (9, 0), "2.11.0+cu130", "13.0")
    assert base.startswith("nvidia-h100-80gb-hbm3-sm90-")
    assert rt.device_key("NVIDIA H200", (9, 0), "2.11.0+cu130", "13.0") != base
    assert rt.device_key("NVIDIA H100 80GB HBM3", (9, 0), "2.13.0+cu130", "13.0") != base
    assert rt.device_key("NVIDIA H100 80GB HBM3", (9, 0), "2.11.0+cu130", "13.0") == base


def test_entry_point_merge_keeps_release_entries() -> None:
    text = "[console_scripts]\nvllm = vllm.entrypoints.cli.main:main\n\n[vllm.general_plugins]\nlora = x:y\n"
    out = add_entry_point(text)
    assert "vllm = vllm.entrypoints.cli.main:main" in out and "lora = x:y" in out and has_entry_point(out)
    assert has_entry_point(add_entry_point("")) and not has_entry_point(text)


def test_forged_wheel_carries_runtime(forged_tune_wheel: Path | None = None) -> None:
    from vllm_forge.build import build
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        whl = build("0.25.1", Path(tmp)).wheel
        with zipfile.ZipFile(whl) as zf:
            di = next(n.split("/")[0] for n in zf.namelist() if n.endswith(".dist-info/RECORD"))
            assert zf.read("vllm/_forge_runtime.py") == (REPO / "vllm_overlay" / "runtime" / "_forge_runtime.py").read_bytes()
            assert has_entry_point(zf.read(f"{di}/entry_points.txt").decode())
        nort = build("0.25.1", Path(tmp), runtime=False).wheel
        assert ".nort" in nort.name and nort.name != whl.name
        with zipfile.ZipFile(nort) as zf:
            assert "vllm/_forge_runtime.py" not in zf.namelist()
