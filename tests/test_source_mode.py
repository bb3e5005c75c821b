"""--mode source: the real vLLM sdist prepared for vLLM's own CUDA build."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

from conftest import run_cli

from vllm_forge.overlay import load_stack


def test_source_tree_from_real_sdist(tmp_path: Path) -> None:
    r = run_cli("build", "--mode", "source", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    root = tmp_path / "vllm-0.19.1-forge-src"
    assert "GIT_TAG bce29425653ec0fbc579d329883030e832d15ada" in \
        (root / "cmake/external_projects/vllm_flash_attn.cmake").read_text()
    reqs = (root / "requirements/cuda.txt").read_text().splitlines()
    assert "quack-kernels>=0.4.0" in reqs and "apache-tvm-ffi>=0.1.5,<0.2" in reqs
    stack = load_stack(["fa4-sm90-hd512"])
    for p in stack.paths:  # the sdist's base files are the wheel's: same overlay results
        assert hashlib.sha256((root / p).read_bytes()).hexdigest() in stack.final_shas(p)
    m = json.loads((root / "vllm-forge-source.json").read_text())
    assert [p["name"] for p in m["patches_vllm"]] == ["0001-flash-attention-pin-bce2942.patch",
                                                      "0002-fa4-requirements.patch"]
    assert m["sdist"]["sha256"] == "9fb88ce6b50991eba41d183584f65f51d7f6015d86a42cdabf79c1c8bd5d66fa"
    script = root / "forge-build.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env_less = subprocess.run(["bash", str(script)], capture_output=True, text=True,
                              env={"PATH": "/usr/bin:/bin"})
    assert env_less.returncode != 0 and "VLLM_FLASH_ATTN_SRC_DIR" in env_less.stderr
    again = run_cli("build", "--mode", "source", "--out", str(tmp_path))
    assert again.returncode == 2 and "exists" in again.stderr
