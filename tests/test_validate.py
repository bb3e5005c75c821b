"""`vllm-forge validate` and `vllm-forge bench` without a GPU: arguments, the one-line refusal where no GPU
is, the two FA4 sides loading in one process, the validation record and `build`'s gate reading it, and the
bench tables from the e2e results of earlier GPU runs (docs/data)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import copy_data, real_wheel, run_cli
from test_hostile import one_error

from vllm_forge.build import BuildResult, check_tune
from vllm_forge.errors import ForgeError
from vllm_forge.gpu import bench as b
from vllm_forge.gpu.trees import STOCK_PKG, runtime_path, stock_files, stub_extensions, wheel_stamp, write_renamed
from vllm_forge.gpu.validate import goals, summarize
from vllm_forge.pins import load_pins
from vllm_forge.series import series_for
from vllm_forge.validation import (
    FORMAT,
    accepted,
    check_record,
    device_class,
    find_records,
    record_path,
    user_data_dir,
    write_record,
)

ROOT = Path(__file__).resolve().parents[1]
E2E = ROOT / "docs" / "data" / "e2e-2026-11-23"


def test_validate_without_gpu_is_one_line(tmp_path: Path) -> None:
    """The CPU test machine has torch without CUDA: one line, exit 2, nothing written."""
    r = run_cli("validate", "--out", str(tmp_path / "o"), env={"VLLM_FORGE_USER_DATA_DIR": str(tmp_path / "d")})
    err = one_error(r)
    assert "no CUDA GPU visible to torch" in err and "run it on the GPU machine" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "d").exists()


@pytest.mark.parametrize(("args", "says"), [
    (["--rounds", "3"], "--rounds 3: the sides alternate"),
    (["--rounds", "0"], "--rounds 0"),
    (["--wheel", "/nonexistent/x.whl"], "forged wheel /nonexistent/x.whl does not exist"),
    (["--path", "/nonexistent"], "--path /nonexistent is not a directory"),
    (["--vllm", "9.9.9"], "unknown vLLM version '9.9.9'"),
])
def test_validate_bad_arguments(args: list[str], says: str) -> None:
    assert says in one_error(run_cli("validate", *args))


def test_validate_argument_parsing() -> None:
    r = run_cli("validate", "--only", "everything")
    assert r.returncode == 2 and "invalid choice: 'everything'" in r.stderr


def test_stock_side_loads_beside_another(tmp_path: Path) -> None:
    """The release's own vllm_flash_attn from the real wheel, tree hash checked, imported as a package of its
    own (what the A/B calls); a wheel of another release is refused as --stock-wheel."""
    vp = load_pins().for_version("0.22.0")
    wheel = real_wheel("0.22.0")
    files, origin = stock_files(vp, wheel, None)
    assert origin == str(wheel) and "cute/interface.py" in files
    write_renamed(files, tmp_path, STOCK_PKG)
    stub_extensions(STOCK_PKG)
    sys.path.insert(0, str(tmp_path))
    try:
        import importlib

        mod = importlib.import_module(f"{STOCK_PKG}.vllm_flash_attn.flash_attn_interface")
        assert Path(mod.__file__).is_relative_to(tmp_path)
        src = (tmp_path / STOCK_PKG / "vllm_flash_attn" / "flash_attn_interface.py").read_text()
        assert "vllm.vllm_flash_attn" not in src and f"{STOCK_PKG}.vllm_flash_attn.cute.interface" in src
    finally:
        sys.path.remove(str(tmp_path))
    with pytest.raises(ForgeError, match="does not hash to vLLM 0.25.1's pin"):  # FA pin 2c839c33, not bce29425
        stock_files(load_pins().for_version("0.25.1"), wheel, None)
    bad = tmp_path / "bad.whl"
    bad.write_text("not a zip")
    with pytest.raises(ForgeError, match="cannot read --stock-wheel"):
        stock_files(vp, bad, None)


def test_forged_wheel_stamp(forged: BuildResult) -> None:
    stamp, files = wheel_stamp(forged.wheel)
    assert stamp["vllm"]["version"] == "0.19.1" and "cute/interface.py" in files
    with pytest.raises(ForgeError, match="not a vllm-forge wheel"):
        wheel_stamp(real_wheel("0.22.0"))


def test_runtime_path_reads_pth(tmp_path: Path) -> None:
    (tmp_path / "nvidia_cutlass_dsl" / "dsl_packages").mkdir(parents=True)
    (tmp_path / "extra").mkdir()
    (tmp_path / "x.pth").write_text("# comment\nimport os\nextra\nmissing\n")
    assert runtime_path(tmp_path) == [str(tmp_path), str(tmp_path / "nvidia_cutlass_dsl" / "dsl_packages"),
                                      str((tmp_path / "extra").resolve())]


def _record(series: str, cls: str = "sm90", passed: bool = True, name: str = "NVIDIA H200") -> dict:
    vp = load_pins().for_version("0.22.1")
    return {"format": FORMAT, "tool": "vllm-forge test", "date": "2026-12-01 10:00:00 UTC", "vllm": "0.22.1",
            "pin_tree_sha256": vp.cute_tree_sha256, "series": series, "passed": passed,
            "device": {"name": name, "capability": f"{cls[2]}.{cls[3:]}", "class": cls, "driver": "580.0"},
            "runtime": {"torch": "2.11.0+cu130"}, "checks": [], "ab": [], "goals": [], "summary": ""}


def test_user_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("VLLM_FORGE_USER_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert user_data_dir() == tmp_path / "xdg" / "vllm-forge"
    monkeypatch.setenv("XDG_DATA_HOME", "relative")  # the XDG spec: ignored unless absolute
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert user_data_dir() == tmp_path / "home" / ".local" / "share" / "vllm-forge"
    monkeypatch.setenv("VLLM_FORGE_USER_DATA_DIR", str(tmp_path / "mine"))
    assert user_data_dir() == tmp_path / "mine"
    assert device_class((9, 0)) == "sm90" and device_class([10, 3]) == "sm103"


def test_record_format(tmp_path: Path) -> None:
    rec = _record("abc1234")
    path = write_record(rec, tmp_path)
    assert path == record_path(rec, tmp_path) and path.parent == tmp_path / "validations"
    assert path.name == f"{rec['pin_tree_sha256'][:12]}-abc1234-sm90-nvidia-h200.json"
    assert json.loads(path.read_text()) == rec
    assert [f.path for f in find_records(rec["pin_tree_sha256"], "abc1234", "sm90", tmp_path)] == [path]
    for bad, says in (({**rec, "format": 0}, "format-1"), ({**rec, "passed": "yes"}, "'passed'"),
                      ({**rec, "pin_tree_sha256": "../x"}, "not a sha256"),
                      ({**rec, "device": {"name": "x", "class": "h200", "capability": "9.0", "driver": "1"}}, "class")):
        with pytest.raises(ValueError, match=says):
            check_record(bad)
    # a damaged file beside it is skipped, not trusted and not fatal
    (tmp_path / "validations" / f"{rec['pin_tree_sha256'][:12]}-broken.json").write_text("{")
    assert len(find_records(rec["pin_tree_sha256"], "abc1234", "sm90", tmp_path)) == 1
    with pytest.raises(ForgeError, match="cannot write the validation record"):
        write_record(rec, tmp_path / "validations" / path.name)  # a file where the directory would be


def test_build_gate_reads_user_records(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A tune release whose series has no project record: refused, unless the user data directory holds a
    passed record of that very series on the device class the build is for."""
    data = copy_data(tmp_path / "data", "patches", "vllm_overlay")
    manifest = json.loads((data / "patches/flash-attention/manifest.json").read_text())
    pins = load_pins()
    vp = pins.for_version("0.22.1")
    manifest["series"][vp.cute_tree_sha256]["validation"] = None
    (data / "patches/flash-attention/manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setenv("VLLM_FORGE_DATA_DIR", str(data))
    monkeypatch.setenv("VLLM_FORGE_USER_DATA_DIR", str(tmp_path / "user"))
    series = series_for(vp.cute_tree_sha256)
    assert series is not None

    def gate(cls: str = "sm90") -> None:
        check_tune(pins, vp, None, "bundled", False, cls)

    with pytest.raises(ForgeError, match="no passed `vllm-forge validate` record for it on sm90"):
        gate()
    for refused in (_record(series.hash, passed=False), _record("0000000"), _record(series.hash, cls="sm100")):
        write_record(refused)
        with pytest.raises(ForgeError, match="is not GPU-validated"):
            gate()
    gate("sm100")  # the sm100 record admits a build for sm100
    assert "validated on NVIDIA H200 (sm100" in capsys.readouterr().err
    write_record(_record(series.hash, name="NVIDIA H20"))
    gate()
    assert accepted(vp.cute_tree_sha256, series.hash, "sm90") is not None
    assert "validated on NVIDIA H20 (sm90, driver 580.0)" in capsys.readouterr().err
    # the command line: --device-class reaches the gate
    r = run_cli("build", "--vllm", "0.22.1", "--device-class", "sm89", "--out", str(tmp_path / "o"),
                env={"VLLM_FORGE_DATA_DIR": str(data), "VLLM_FORGE_USER_DATA_DIR": str(tmp_path / "user")})
    assert "no passed `vllm-forge validate` record for it on sm89" in one_error(r)
    r = run_cli("build", "--vllm", "0.22.1", "--device-class", "H200", "--out", str(tmp_path / "o"))
    assert "--device-class 'H200' -- give the compute capability as sm<major><minor>" in one_error(r)
    assert not (tmp_path / "o").exists()


def test_ab_order_ratios() -> None:
    """The A/B summary keeps the per-order ratios apart: a side that is faster only when it goes first
    shows it (the arithmetic of the table, on made-up sample times)."""
    row = {"head": 512, "page": 64, "case": "prefill 4x4096", "samples": {
        "forged": [{"position": 0, "graph_ms": 1.0, "eager_ms": 1.1}, {"position": 1, "graph_ms": 1.2, "eager_ms": 1.3}],
        "stock": [{"position": 1, "graph_ms": 2.0, "eager_ms": 2.1}, {"position": 0, "graph_ms": 2.0, "eager_ms": 2.1}]}}
    summarize(row)
    assert row["forged"] == {"graph_ms": 1.0, "eager_ms": 1.1} and row["ratio"] == 0.5
    assert row["ratio_by_order"] == {"forged first": 0.5, "stock first": pytest.approx(0.6)}
    got = goals([{"name": "a", "ok": True}], [row, {**row, "case": "decode 64x8192", "ratio": 1.03}])
    assert [g["ok"] for g in got] == [True, True, False]


def test_bench_arguments(tmp_path: Path) -> None:
    cfg = b.parse_config("forged-b32=forged:--attention-backend FLASH_ATTN --block-size 32 "
                         "--attention-config.flash_attn_version=4 --enforce-eager VLLM_FORGE_RUNTIME=0")
    assert cfg.side == "forged" and cfg.env == {"VLLM_FORGE_RUNTIME": "0"}
    assert cfg.engine == {"attention_config": {"backend": "FLASH_ATTN", "flash_attn_version": 4}, "block_size": 32,
                          "enforce_eager": True}
    assert b.parse_lens("8192,32768,131072") == (8192, 32768, 131072)
    assert b.parse_decode("16x32768x256") == (16, 32768, 256)
    stock = tmp_path / "stock"
    (stock / "vllm").mkdir(parents=True)
    (stock / "vllm" / "__init__.py").write_text("")
    for args, says in ((["--prompt-lens", "8k"], "--prompt-lens '8k'"), (["--decode", "16x0x1"], "--decode '16x0x1'"),
                       (["--config", "x=elsewhere"], "--config 'x=elsewhere'"),
                       (["--config", "a=stock:block-size 3"], "engine argument 'block-size' is not an --option"),
                       (["--config", "a=stock", "--config", "a=stock"], "--config names repeat"),
                       ([], "--forged-path is missing"),
                       (["--config", "a=stock", "--site", "/nonexistent"], "--site /nonexistent")):
        err = one_error(run_cli("bench", "--stock-path", str(stock), "--out", str(tmp_path / "o"), *args))
        assert says in err
    assert "holds no vllm/ package" in one_error(run_cli("bench", "--stock-path", str(tmp_path), "--forged-path",
                                                         str(stock), "--out", str(tmp_path / "o")))
    assert "bench needs --out" in one_error(run_cli("bench"))
    # well-formed, on this CPU machine: one line, nothing written
    err = one_error(run_cli("bench", "--stock-path", str(stock), "--forged-path", str(stock), "--out", str(tmp_path / "o")))
    assert "no CUDA GPU visible to torch" in err and "run it on the GPU machine" in err
    assert not (tmp_path / "o").exists()


def test_bench_report_from_saved_results() -> None:
    """The tables of the 2026-11-23 H100 run (docs/data) from its JSON: every number is the file's."""
    r = run_cli("bench", "--report", str(E2E))
    assert r.returncode == 0, r.stderr
    raw = {p.stem.removeprefix("e2e_"): json.loads(p.read_text()) for p in E2E.glob("e2e_*.json")
           if p.stem not in ("e2e_hf", "e2e_model")}
    lines = {ln.split(" | ")[0].strip("| "): ln for ln in r.stdout.splitlines() if ln.startswith("| ")}
    for name, x in raw.items():
        row = next(ln for ln in r.stdout.splitlines() if ln.startswith(f"| {name} | {x['vllm']} |"))
        assert f"{x['prefill_tok_s']:,.0f}" in row and f"{x['decode_tok_s']:,.0f}" in row
        assert f"→ {x['block_size']}" in row
        shape = next(lay["kv_cache_shape"] for lay in x["layers"].values() if lay["head_size"] == 512)
        assert str(shape) in row
    s, f = raw["stock-default"], raw["forged-default"]
    ratio = next(ln for ln in r.stdout.splitlines() if ln.startswith("| forged-default | 1."))
    assert f"{f['prefill_tok_s'] / s['prefill_tok_s']:.3f} | {f['decode_tok_s'] / s['decode_tok_s']:.3f}" in ratio
    assert "| stock-default | 4 × 8192 |" in r.stdout and lines
    # the greedy agreement is the earlier harness's (docs/e2e.md: 0.816 for forged-default vs stock-default)
    same, _ = b.agreement(f["greedy"], s["greedy"])
    assert f"{same:.3f}" in ratio


def test_bench_report_refuses_other_json(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text('{"name": "a"}')
    assert "cannot read bench result" in one_error(run_cli("bench", "--report", str(tmp_path / "x.json")))


def test_shape_is_package_data() -> None:
    """The model shape travels with the installed package (the wheel's vllm_forge/gpu/)."""
    shape = json.loads(b.SHAPE.read_text())
    assert shape["global_head_dim"] == 512 and shape["num_global_key_value_heads"] == 4
    assert b.SHAPE.parent.name == "gpu"


def test_gpu_commands_import_light() -> None:
    """On a GPU image without vllm-forge's build dependencies: `bench` needs neither GitPython nor installer,
    and neither command imports torch before it is run."""
    code = ("import sys, vllm_forge.cli, vllm_forge.gpu.bench, vllm_forge.gpu.validate; "
            "print(sorted(m for m in ('git', 'installer', 'torch', 'vllm') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"


def test_validate_report_and_record_of_a_result(tmp_path: Path) -> None:
    """A result as `validate` writes it (made-up numbers: the table's and the record's format only), with a
    stock side that refuses a case, a skipped and a failed check: the table says so, and the record of a
    failed run is written but not accepted by the gate."""
    from vllm_forge.gpu.validate import format_row, report

    row = {"head": 512, "page": 16, "case": "prefill 4x4096", "flops": 1e12, "kv_bytes": 1, "refused": {
        "stock": "RuntimeError: head_dim must be less than or equal to 256"}, "samples": {
        "forged": [{"round": 0, "position": 0, "graph_ms": 2.0, "eager_ms": 2.5}]}, "sm_clock_mhz": None}
    summarize(row)
    assert "refused" in format_row(row) and "500 TFLOP/s / 400 TFLOP/s" in format_row(row)
    checks = [{"name": "hd512 page16 gqa8:1 causal", "ok": False, "rel_l2": float("inf"), "error": "ValueError: x"},
              {"name": "hd512 page64 fp8 KV", "ok": True, "skipped": "no KV descales"}]
    rec = {**_record("abc1234"), "checks": checks, "ab": [row], "rounds": 2, "only": "all",
           "clock": {"source": "none", "note": "not sampled: neither pynvml nor nvidia-smi is available"}}
    rec["goals"] = goals(checks, [row])
    rec["passed"] = all(g["ok"] for g in rec["goals"] if g["required"])
    text = report(rec)
    assert "checks: 1/2 passed" in text and "FAIL hd512 page16 gqa8:1 causal: rel L2 inf ValueError: x" in text
    assert "SKIP hd512 page64 fp8 KV: no KV descales" in text and text.endswith("NOT PASSED")
    assert "SM clock: not sampled" in text
    write_record(rec, tmp_path)
    assert find_records(rec["pin_tree_sha256"], "abc1234", "sm90", tmp_path)
    assert accepted(rec["pin_tree_sha256"], "abc1234", "sm90", tmp_path) is None


@pytest.mark.parametrize("run", sorted(p.name for p in (ROOT / "docs" / "data").glob("e2e-*")))
def test_bench_report_of_every_saved_run(run: str) -> None:
    """Every e2e run in docs/data renders (its manifests and reference files beside the results are skipped);
    each result's warm TTFT median is the file's."""
    r = run_cli("bench", "--report", str(ROOT / "docs" / "data" / run))
    assert r.returncode == 0, r.stderr
    for p in (ROOT / "docs" / "data" / run).glob("e2e_*.json"):
        x = json.loads(p.read_text())
        if "layers" in x:
            warm = sorted([x["ttft_warm_s"], *x.get("ttft_warm_more_s", [])])
            med = (warm[(len(warm) - 1) // 2] + warm[len(warm) // 2]) / 2
            assert f"| {x['name']} | " in r.stdout and f"{x['ttft_first_s']:.3f} / {med:.3f}" in r.stdout


H200 = ROOT / "docs" / "data" / "validate-2026-12-01-h200"


@pytest.mark.parametrize(("version", "has"), [("0.25.1", False), ("0.33.0", True)])
def test_fp8_kv_path_read_from_the_tree(version: str, has: bool) -> None:
    """The fp8-KV check runs where the release's FA4 has the bf16-q / e4m3-KV path (flash-attention 06bdd47
    on), else it is skipped: on the H200 (2026-12-01) 0.25.1's FA4 refused it ("inputs must have the same
    dtype") while an older heuristic had found KV descales in the wrapper's text."""
    from vllm_forge.gpu.validate import fp8_kv_path

    vp = load_pins().for_version(version)
    files, _ = stock_files(vp, None, None)
    why = fp8_kv_path(files["flash_attn_interface.py"].decode(), files["cute/interface.py"].decode())
    assert (why == "") is has, why
    if not has:
        failed = json.loads((H200 / f"validate-{version}-sm90-nvidia-h200.json").read_text())["checks"][-1]
        assert "fp8 KV" in failed["name"] and "inputs must have the same dtype" in failed["error"]


def test_h200_record_admits_the_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The record `vllm-forge validate` wrote on the H200 for 0.33.0 (docs/data) is what lets `build`
    forge 0.33.0 without --allow-unvalidated once the tool's own record of the series is gone; the failed
    0.25.1 record does not admit 0.25.1."""
    data = copy_data(tmp_path / "data")
    manifest = json.loads((data / "patches/flash-attention/manifest.json").read_text())
    pins = load_pins()
    for version in ("0.33.0", "0.25.1"):
        manifest["series"][pins.vllm[version].cute_tree_sha256]["validation"] = None
    (data / "patches/flash-attention/manifest.json").write_text(json.dumps(manifest))
    env = {"VLLM_FORGE_DATA_DIR": str(data), "VLLM_FORGE_USER_DATA_DIR": str(tmp_path / "user")}
    real_wheel("0.33.0")
    assert "is not GPU-validated" in one_error(run_cli("build", "--vllm", "0.33.0", "--out", str(tmp_path / "o"),
                                                       env=env))
    for version in ("0.33.0", "0.25.1"):
        rec = json.loads((H200 / f"validate-{version}-sm90-nvidia-h200.json").read_text())
        assert rec["device"]["name"] == "NVIDIA H200" and rec["passed"] is (version == "0.33.0")
        write_record(rec, tmp_path / "user")
    r = run_cli("build", "--vllm", "0.33.0", "--out", str(tmp_path / "o"), env=env)
    assert r.returncode == 0, r.stderr
    assert "validated on NVIDIA H200 (sm90, driver 580.159.04) on 2026-12-01" in r.stderr
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ForgeError, match="its GPU validation|is not GPU-validated"):
        check_tune(pins, pins.vllm["0.25.1"], None, "bundled", False, "sm90")


def test_ab_pages_and_fp8_rows() -> None:
    """`--pages` picks the A/B page sizes (issue: 16/32/64/128); fp8-KV rows (head 512, 64-token pages) are
    added where the tree has the path, reported but not gated: an fp8 decode row slower than stock does not
    fail the decode goal the bf16 rows decide."""
    from vllm_forge.gpu.validate import ab_plan

    plan = ab_plan((16, 32, 64, 128), fp8=True)
    assert {(h, p) for h, p, _, f in plan if not f} == {(h, p) for h in (512, 256) for p in (16, 32, 64, 128)}
    assert [(h, p, c) for h, p, c, f in plan if f] == [(512, 64, "prefill 4x4096"), (512, 64, "prefill 1x16384"),
                                                     (512, 64, "decode 64x8192")]
    assert not any(f for *_, f in ab_plan((16, 64), fp8=False))

    def row(case: str, forged: float, kv: str | None = None) -> dict:
        r = {"head": 512, "page": 64, "case": case, "flops": 1e12, "kv_bytes": 10**9, "refused": {}, "samples": {
            "forged": [{"round": 0, "position": 0, "graph_ms": forged, "eager_ms": forged},
                       {"round": 1, "position": 1, "graph_ms": forged, "eager_ms": forged}],
            "stock": [{"round": 0, "position": 1, "graph_ms": 1.0, "eager_ms": 1.0},
                      {"round": 1, "position": 0, "graph_ms": 1.0, "eager_ms": 1.0}]}, **({"kv": kv} if kv else {})}
        summarize(r)
        return r
    rows = [row("prefill 4x4096", 0.7), row("decode 64x8192", 0.95), row("decode 64x8192", 1.05, "fp8")]
    got = {g["goal"]: g for g in goals([{"name": "x", "ok": True, "rel_l2": 0.0}], rows)}
    assert all(g["ok"] for g in got.values()), got
    from vllm_forge.gpu.validate import format_row
    assert format_row(rows[2]).startswith("decode 64x8192 fp8")
    r = run_cli("validate", "--pages", "16,48")
    assert "--pages 16,48 -- give distinct page sizes from 16, 32, 64, 128" in one_error(r)
    r = run_cli("validate", "--pages", "sixteen")
    assert r.returncode == 2 and "is not a comma-separated list of page sizes" in r.stderr


@pytest.mark.parametrize("version, passed", [("0.33.0", True), ("0.25.1", False)])
def test_h200_results_render(version: str, passed: bool) -> None:
    """The README's H200 table is the saved results read back by `validate`'s own report."""
    from vllm_forge.gpu.validate import report

    text = report(json.loads((H200 / f"validate-{version}-sm90-nvidia-h200.json").read_text()))
    assert text.endswith("PASSED" if passed else "NOT PASSED")
    assert ("prefill 4x4096       hd512 page64  |    487 TFLOP/s" in text) is passed


DRY_RUN = r"""
import json, sys
from pathlib import Path
site, out, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
sys.path.insert(0, sys.argv[4])  # tests/: the faked device
import vllm_forge.gpu.validate as v
import torch
v.require_gpu = lambda: torch
v.device_info = lambda t: {"name": "CPU dry run", "capability": "9.0", "class": "sm90", "driver": "none",
                           "memory_gib": 0, "sms": 0}
v._nvml_index = lambda t: 0
seen = {}
def checks(torch, sides):
    seen["forged"] = sides.forged_interface.__name__
    seen["fp8"] = sides.no_fp8
    return [{"name": "dry", "ok": True, "rel_l2": 0.0, "s": 0}]
v.run_checks, v.run_ab = checks, lambda *a, **k: []
if mode == "installed":
    sys.path.insert(0, str(site))
    from fake_gpu import install
    install()  # the compiled FA2/FA3 extensions, as far as vLLM can tell
    req = v.ValidateRequest(vllm="0.19.1", out=out, rounds=2)
else:
    req = v.ValidateRequest(vllm="0.19.1", wheel=Path(sys.argv[5]), out=out, rounds=2)
rc = v.validate(req)
print(json.dumps({"rc": rc, **seen}))
"""


@pytest.mark.parametrize("mode", ["installed", "wheel"])
def test_validate_flow_without_kernels(mode: str, forged: BuildResult, tmp_path: Path) -> None:
    """`validate` end to end on this CPU machine with the kernel calls left out (the GPU and its numbers
    faked): the forged side from the installed forged wheel (its .py files and dist-info on sys.path, as
    pip installs them) or from --wheel, the stock side from the release's wheel with its tree hash
    checked, both loaded in one process, the result JSON and the record written, and a run without A/B
    not recorded as passed."""
    import zipfile

    site = tmp_path / "site"
    with zipfile.ZipFile(forged.wheel) as zf:
        zf.extractall(site, [n for n in zf.namelist() if n.endswith(".py") or ".dist-info/" in n])
    script = tmp_path / "dry.py"
    script.write_text(DRY_RUN)
    env = {**os.environ, "VLLM_FORGE_USER_DATA_DIR": str(tmp_path / "user")}
    r = subprocess.run([sys.executable, str(script), str(site), str(tmp_path / "out"), mode,
                        str(Path(__file__).parent), str(forged.wheel)], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["rc"] == 1  # no A/B: not passed
    assert got["forged"] == ("vllm" if mode == "installed" else "vllmforged") + ".vllm_flash_attn.flash_attn_interface"
    assert got["fp8"].startswith("this tree's FA4 has no fp8-KV path")
    result = json.loads((tmp_path / "out" / "validate-0.19.1-sm90-cpu-dry-run.json").read_text())
    assert result["forged"] == (f"installed {site}" if mode == "installed" else str(forged.wheel))
    assert result["stock"].startswith("cache vllm-0.19.1-") and result["passed"] is False
    stamp_series = result["series"]
    assert stamp_series and result["fa4_tree_sha256"] != result["pin_tree_sha256"]
    assert [p.name for p in (tmp_path / "user" / "validations").iterdir()] == [
        f"{result['pin_tree_sha256'][:12]}-{stamp_series}-sm90-cpu-dry-run.json"]
