"""Wheel-level checks on the real forged vLLM 0.19.1 wheel."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

from conftest import default_fa_series, run_cli

from vllm_forge.build import BuildResult, build
from vllm_forge.fa4 import CUTE, WHEEL_CUTE, tree_sha256, zip_tree
from vllm_forge.pins import Pins
from vllm_forge.verify import STAMP, verify_wheel

OVERLAID = (
    "vllm/v1/attention/backends/fa_utils.py",
    "vllm/v1/attention/backends/flash_attn.py",
    "vllm/vllm_flash_attn/flash_attn_interface.py",
)
GEMMA4 = "vllm/model_executor/models/config.py"  # the gemma4-fa4 layer, on by default for 0.19.x


def test_name_version_and_tags(forged: BuildResult, base_wheel: Path, pins: Pins) -> None:
    assert forged.wheel.name == "vllm-0.19.1+fa4.bce2942.p952cdd5.gemma4-cp38-abi3-manylinux_2_31_x86_64.whl"
    with zipfile.ZipFile(forged.wheel) as out, zipfile.ZipFile(base_wheel) as base:
        meta = out.read("vllm-0.19.1+fa4.bce2942.p952cdd5.gemma4.dist-info/METADATA").decode()
        assert "\nVersion: 0.19.1+fa4.bce2942.p952cdd5.gemma4\n" in meta
        assert out.read("vllm-0.19.1+fa4.bce2942.p952cdd5.gemma4.dist-info/WHEEL") == base.read("vllm-0.19.1.dist-info/WHEEL")
        assert not [n for n in out.namelist() if n.startswith("vllm-0.19.1.dist-info/")]
        reqs = [ln for ln in meta.split("\n\n")[0].splitlines() if ln.startswith("Requires-Dist:")]
        assert "Requires-Dist: quack-kernels>=0.2.7,>=0.4.0" in reqs  # merged with 0.19.1's own
        assert "Requires-Dist: apache-tvm-ffi<0.2,>=0.1.5" in reqs
        assert "Requires-Dist: torch==2.10.0" in reqs  # the rest untouched
        base_reqs = [ln for ln in base.read("vllm-0.19.1.dist-info/METADATA").decode().split("\n\n")[0].splitlines()
                     if ln.startswith("Requires-Dist:")]
        assert len(reqs) == len(base_reqs) + 2  # tvm-ffi and torch-c-dlpack-ext are new


def test_cute_tree_replaced(forged: BuildResult, base_wheel: Path, pins: Pins, fa_upstream: Path) -> None:
    with zipfile.ZipFile(forged.wheel) as out, zipfile.ZipFile(base_wheel) as base:
        cute, old = zip_tree(out, WHEEL_CUTE), set(zip_tree(base, WHEEL_CUTE))
    src = fa_upstream / CUTE
    pin = {str(f.relative_to(src)): f.read_bytes().replace(b"flash_attn.cute", b"vllm.vllm_flash_attn.cute")
           for f in src.rglob("*.py")}
    assert tree_sha256(pin) == pins.fa.cute_tree_sha256  # the pin, as vLLM's CMake rewrites it
    assert len(cute) == pins.fa.cute_file_count and set(cute) == set(pin)
    # the pin + the shipped patch series: exactly the files the series touches differ
    assert {n for n in cute if cute[n] != pin[n]} == set().union(*(t for _, _, t in default_fa_series()))
    # 0001: SM90 head > 256 keeps P in registers for the PV GEMM (measured in docs/fa4-sm90-tuning.md)
    assert b"return FwdConfig(64, tile_n, False, True)" in pin["interface.py"]
    assert b"return FwdConfig(64, tile_n, True, True)" in cute["interface.py"]
    assert "flash_fwd_sm90.py" in cute and "flash_fwd_sm90.py" not in old  # new in the pin
    assert all(b"from flash_attn.cute" not in d for d in cute.values())
    assert b"vllm.vllm_flash_attn.cute" in cute["interface.py"]
    assert b"is_sm90_range = 8 <= head_dim <= 512" in cute["interface.py"]
    gone = old - set(cute)
    assert all(f"{WHEEL_CUTE}/{g}" not in set(zipfile.ZipFile(forged.wheel).namelist()) for g in gone)


def test_unchanged_members_are_bit_identical(forged: BuildResult, base_wheel: Path) -> None:
    with zipfile.ZipFile(forged.wheel) as out, zipfile.ZipFile(base_wheel) as base:
        outinfo = {i.filename: i for i in out.infolist()}
        dropped = ("vllm-0.19.1.dist-info/", WHEEL_CUTE + "/")
        kept = [i for i in base.infolist() if not i.filename.startswith(dropped)
                and i.filename not in (*OVERLAID, GEMMA4)]
        assert len(kept) > 2000
        for i in kept:
            o = outinfo[i.filename]
            assert (o.CRC, o.compress_size, o.file_size, o.compress_type, o.date_time) == \
                (i.CRC, i.compress_size, i.file_size, i.compress_type, i.date_time), i.filename
        for p in (*OVERLAID, GEMMA4):
            assert out.read(p) != base.read(p)


def test_overlay_files_match_manifest(forged: BuildResult) -> None:
    manifest = json.loads((Path(__file__).parents[1] / "vllm_overlay" / "manifest.json").read_text())
    results = {b["path"]: b["results"]["fa4-sm90-hd512"] for b in manifest["bases"].values()
               if "fa4-sm90-hd512" in b["results"] and "0.19.1" in b["seen_in"]}
    with zipfile.ZipFile(forged.wheel) as out:
        for p in OVERLAID:
            assert hashlib.sha256(out.read(p)).hexdigest() == results[p]
        text = out.read("vllm/vllm_flash_attn/flash_attn_interface.py").decode()
    assert "FA4 with paged KV is not supported on SM90" not in text


def test_manifest_records_inputs(forged: BuildResult, pins: Pins) -> None:
    m = json.loads(forged.manifest.read_text())
    assert m["output"]["sha256"] == hashlib.sha256(forged.wheel.read_bytes()).hexdigest()
    assert m["inputs"]["base_wheel"]["sha256"] == pins.vllm["0.19.1"].wheel_sha256
    assert m["inputs"]["base_wheel"]["mirror"]
    assert m["inputs"]["flash_attention"]["tree_sha256"] == pins.fa.cute_tree_sha256
    assert m["inputs"]["flash_attention"]["mirror"]
    assert m["overlay"]["layers"] == ["fa4-sm90-hd512", "gemma4-fa4"] and m["fa4_mode"] == "bundled"
    assert len(m["overlay"]["files"]) == 4 and m["overlay"]["adds"] == {}
    assert [(p["name"], p["sha256"]) for p in m["flash_attention"]["patches"]] == \
        [(n, h) for n, h, _ in default_fa_series()]
    with zipfile.ZipFile(forged.wheel) as out:
        cute = zip_tree(out, WHEEL_CUTE)
    assert m["flash_attention"]["tree_sha256"] == tree_sha256(cute) != pins.fa.cute_tree_sha256
    assert m["flash_attention"]["pin_tree_sha256"] == pins.fa.cute_tree_sha256
    assert m["tool"].startswith("vllm-forge ")
    assert isinstance(m["source_date_epoch"], int)
    with zipfile.ZipFile(forged.wheel) as out:
        stamp = json.loads(out.read(f"vllm-0.19.1+fa4.bce2942.p952cdd5.gemma4.dist-info/{STAMP}"))
    assert stamp["overlay"] == m["overlay"] and "mirror" not in json.dumps(stamp)


def test_verify_deep_passes(forged: BuildResult) -> None:
    report = verify_wheel(forged.wheel, deep=True)  # the base is in the cache: rebuilt and compared
    assert report.level == "rebuild" and any("bit for bit identical to a rebuild" in c for c in report.checks)
    report = verify_wheel(forged.wheel, deep=True, use_base=False)
    assert any("installer validates" in c for c in report.checks) and "self-consistency only" in report.level
    r = run_cli("verify", str(forged.wheel), "--quick")
    assert r.returncode == 0 and "verified" in r.stdout


def test_verify_rejects_tampered_wheel(forged: BuildResult, tmp_path: Path) -> None:
    bad = tmp_path / forged.wheel.name
    with zipfile.ZipFile(forged.wheel) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == f"{WHEEL_CUTE}/interface.py":
                data += b"\n# tampered\n"
            dst.writestr(info, data)
    r = run_cli("verify", str(bad))
    assert r.returncode == 2
    assert "vllm/vllm_flash_attn/cute/interface.py differs from what vllm-forge builds" in r.stderr
    r = run_cli("verify", "--no-base", str(bad))
    assert r.returncode == 2
    assert "RECORD hash/size mismatch for vllm/vllm_flash_attn/cute/interface.py" in r.stderr


def test_reproducible(forged: BuildResult, tmp_path: Path, monkeypatch) -> None:
    again = build("0.19.1", tmp_path / "again")
    assert again.wheel.read_bytes() == forged.wheel.read_bytes()
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    one = build("0.19.1", tmp_path / "one").wheel.read_bytes()
    two = build("0.19.1", tmp_path / "two").wheel.read_bytes()
    assert one == two != forged.wheel.read_bytes()
    with zipfile.ZipFile(tmp_path / "one" / forged.wheel.name) as z:
        assert z.getinfo(OVERLAID[0]).date_time == (2023, 11, 14, 22, 13, 20)
