"""`vllm-forge fa4-cache` and the kernel cache in the image: what can be checked without a GPU (the
GPU runs of docs/e2e.md)."""

from __future__ import annotations

import ast
import hashlib
import json
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest
from conftest import run_cli

from vllm_forge import docker as dk
from vllm_forge.build import BuildResult
from vllm_forge.errors import ForgeError
from vllm_forge.kernel_cache import check_cache, read_manifest, stage_cache
from vllm_forge.kernel_cache_child import MANIFEST, Refusal, kernels, layer_overrides, merge_manifest


def test_layer_overrides_keep_every_layer_type() -> None:
    from transformers import Gemma4Config, Gemma4TextConfig

    from vllm_forge.gpu.bench import SHAPE

    shape = json.loads(SHAPE.read_text())
    kw = {k: v for k, v in shape.items() if not k.startswith("_") and k != "sliding_window_pattern"}
    types_ = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(60)]
    text = Gemma4TextConfig(num_hidden_layers=60, layer_types=types_, **kw)
    assert layer_overrides(text, 6) == {"num_hidden_layers": 6, "layer_types": types_[:6]}
    assert layer_overrides(text, None) is None and layer_overrides(text, 60) is None
    with pytest.raises(Refusal, match="use --layers 6 or more"):
        layer_overrides(text, 5)  # the head-512 global layer would be gone
    nested = layer_overrides(Gemma4Config(text_config=text.to_dict()), 12)  # Gemma-4 as published: multimodal
    assert nested == {"text_config": {"num_hidden_layers": 12, "layer_types": types_[:12]}}


def _cache(tmp: Path, version: str = "0.22.1+fa4.bce2942.p952cdd5") -> Path:
    """A cache directory as the child leaves it: kernels under <device key>/<fingerprint>/<name>/,
    FA4's lock files beside them, and the manifest."""
    root = tmp / "cache"
    for i, name in enumerate(("fwd", "fwd_combine")):
        d = root / "nvidia-h100-80gb-hbm3-sm90-4e1650ed80d0" / ("ab" * 32) / name
        d.mkdir(parents=True)
        (d / f"{i:064x}.o").write_bytes(b"\x7fELF kernel %d" % i)
        (d / f"{i:064x}.lock").write_bytes(b"")
    files = kernels(root)
    manifest = merge_manifest(None, version, "0" * 64, {"id": "m|tp1", "model": "m"}, files)
    (root / MANIFEST).write_text(json.dumps(manifest))
    return root


def test_manifest_merges_models_and_refuses_another_vllm(tmp_path: Path) -> None:
    root = _cache(tmp_path)
    old = read_manifest(root)
    merged = merge_manifest(old, old["vllm"], "0" * 64, {"id": "n|tp2", "model": "n"}, kernels(root))
    assert [m["id"] for m in merged["models"]] == ["m|tp1", "n|tp2"]
    assert merged["device_keys"] == ["nvidia-h100-80gb-hbm3-sm90-4e1650ed80d0"] and len(merged["kernels"]) == 2
    with pytest.raises(Refusal, match="holds FA4 kernels of vllm 0.22.1"):
        merge_manifest(old, "0.25.1+fa4.2c839c3.p1", "0" * 64, {"id": "x"}, kernels(root))


def test_check_cache_for_the_image(tmp_path: Path) -> None:
    root = _cache(tmp_path)
    assert len(check_cache(root, "0.22.1+fa4.bce2942.p952cdd5")["kernels"]) == 2
    with pytest.raises(ForgeError, match="made with vllm 0.22.1.*the image gets 0.19.1"):
        check_cache(root, "0.19.1+fa4.bce2942.p952cdd5")
    staged = tmp_path / "ctx"
    assert stage_cache(root, staged) == 2
    assert not list(staged.rglob("*.lock")) and (staged / MANIFEST).is_file()  # FA4 makes its locks itself
    kernel = next(root.rglob("*.o"))
    kernel.write_bytes(b"another kernel")
    with pytest.raises(ForgeError, match="differs from its manifest"):
        check_cache(root, "0.22.1+fa4.bce2942.p952cdd5")
    with pytest.raises(ForgeError, match="is not an FA4 kernel cache"):
        check_cache(tmp_path, "0.22.1+fa4.bce2942.p952cdd5")


def test_docker_refuses_a_cache_of_another_wheel(tmp_path: Path) -> None:
    root = _cache(tmp_path, version="0.22.1+fa4.bce2942.p952cdd5")
    with pytest.raises(ForgeError, match="the image gets 0.19.1"):
        dk.docker(None, tmp_path / "out", build=True, context=Path("."), tag=None, fa4_cache=root)


@pytest.mark.parametrize("args, message", [
    (["--layers", "0"], "--layers 0 is not a layer count"),
    (["--python", "/nonexistent/python3"], "--python /nonexistent/python3 does not exist"),
    ([], "no vLLM in"),  # this test environment has no vLLM installed
])
def test_cli_refusals_leave_nothing(tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "new" / "cache"
    r = run_cli("fa4-cache", "--model", "google/gemma-4-31b-it", "--out", str(out), *args)
    assert r.returncode == 2, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("vllm-forge: error:")]
    assert len(errors) == 1 and message in errors[0] and " -- " in errors[0]
    assert not (tmp_path / "new").exists()


def test_image_checks_the_cache_against_the_installed_wheel(tmp_path: Path, forged: BuildResult) -> None:
    """The RUN line of the rendered Dockerfile that admits a kernel cache, run against the real forged
    wheel's dist-info: the matching version passes, another is refused."""
    r = run_cli("docker", "--out", str(tmp_path / "render"))
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "render" / "Dockerfile").read_text()
    assert "ENV VLLM_FORGE_FA4_CACHE_DIR=/opt/vllm-forge/fa4-cache" in text
    assert "--mount=type=bind,from=fa4cache,target=/fa4cache" in text and "chmod -R a+rwX /opt/vllm-forge/fa4-cache" in text
    check = next(ln for ln in text.splitlines() if "/opt/vllm/bin/python -c" in ln)
    code = check.split("-c '", 1)[1].split("' /fa4cache", 1)[0]
    site = tmp_path / "site"
    with zipfile.ZipFile(forged.wheel) as zf:
        zf.extractall(site, [n for n in zf.namelist() if ".dist-info/" in n])
    version = forged.wheel.name.split("-")[1]
    for made, ok in ((version, True), ("0.22.1+fa4.bce2942.p952cdd5", False)):
        (tmp_path / MANIFEST).write_text(json.dumps({"vllm": made}))
        p = subprocess.run([sys.executable, "-c", code, str(tmp_path / MANIFEST)], capture_output=True, text=True,
                           env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
        assert (p.returncode == 0) == ok, p.stderr
        if not ok:
            assert f"the image has {version}" in p.stderr


def _fa4_fingerprint(cute: Path) -> types.FunctionType:
    """FA4's own cache key function, taken from the cache_utils.py the forged wheel ships and run
    as written (its module needs cutlass and tvm_ffi, which are not installed here)."""
    source = (cute / "cache_utils.py").read_text()
    fn = next(n for n in ast.parse(source).body
              if isinstance(n, ast.FunctionDef) and n.name == "_compute_source_fingerprint")
    fn.decorator_list = []
    ns: dict = {"__file__": str(cute / "cache_utils.py"), "Path": Path, "hashlib": hashlib, "sys": sys}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "cache_utils.py", "exec"), ns)
    return ns["_compute_source_fingerprint"]  # type: ignore[no-any-return]


def test_fa4_cache_key_misses_on_another_tree_or_cutlass(tmp_path: Path, forged: BuildResult) -> None:
    """The cache path is <device key>/<FA4 fingerprint>: the device key is ours (GPU, torch, CUDA:
    test_runtime), the fingerprint FA4's. Change the FA4 tree or cutlass-dsl: another directory,
    so the kernels of the old one are never loaded (shown on the H100 too: forged-keymiss)."""
    with zipfile.ZipFile(forged.wheel) as zf:
        zf.extractall(tmp_path, [n for n in zf.namelist() if n.startswith("vllm/vllm_flash_attn/cute/")])
    cute = tmp_path / "vllm" / "vllm_flash_attn" / "cute"
    key = _fa4_fingerprint(cute)
    runtime = {"cutlass": types.SimpleNamespace(__version__="4.5.2"), "tvm_ffi": types.SimpleNamespace(__version__="0.1.9")}
    key.__globals__.update(runtime)
    base = key()
    assert key() == base and len(base) == 64
    key.__globals__["cutlass"] = types.SimpleNamespace(__version__="4.6.0")
    assert key() != base
    key.__globals__.update(runtime)
    (cute / "_another.py").write_text("# one more file in the FA4 tree\n")
    assert key() != base
