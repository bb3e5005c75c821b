"""A compile cache shared through Redis: sccache as the CMake compiler launcher, a real
redis-server on loopback, the same small C++ and CUDA (nvcc, sm_90a) targets built twice from
clean build directories."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vllm_forge.fa4 import cmake_exe

REPO = Path(__file__).resolve().parents[1]
needs = [t for t in ("redis-server", "sccache", "c++") if shutil.which(t) is None]
NVCC = shutil.which("nvcc")  # CUDA part: wherever nvcc is (CI machines have nvcc 13.0)
pytestmark = pytest.mark.skipif(bool(needs), reason=f"missing {needs} (.ci/run installs them)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    for _ in range(100):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


def test_sccache_redis_cache_hits(redis: str, tmp_path: Path) -> None:
    env = {**os.environ, "SCCACHE_REDIS_ENDPOINT": redis, "SCCACHE_SERVER_PORT": str(free_port()),
           "SCCACHE_DIR": str(tmp_path / "local-unused"), "SCCACHE_IDLE_TIMEOUT": "0"}
    sccache = shutil.which("sccache")
    assert sccache
    subprocess.run([sccache, "--stop-server"], env=env, capture_output=True)
    subprocess.run([sccache, "--start-server"], env=env, check=True, capture_output=True)
    try:
        stats = []
        for i in range(2):  # two clean build trees of the same project: the second compile is a hit
            build = tmp_path / f"build{i}"
            subprocess.run([sccache, "--zero-stats"], env=env, check=True, capture_output=True)
            cfg = subprocess.run([cmake_exe(), "-S", str(REPO), "-B", str(build), "-DVLLM_FORGE_CACHE_SELFTEST=ON",
                                  "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON"],
                                 env=env, check=True, capture_output=True, text=True)
            assert f"compiler launcher: {sccache}" in cfg.stdout
            subprocess.run([cmake_exe(), "--build", str(build)], env=env, check=True, capture_output=True)
            if NVCC:  # TORCH_CUDA_ARCH_LIST's default 9.0a reached nvcc, through the launcher
                assert "CUDA architectures 90a-real" in cfg.stdout
                assert (build / "libvllm_forge_cache_selftest_cuda.a").stat().st_size > 0
                cu = [c for c in json.loads((build / "compile_commands.json").read_text())
                      if c["file"].endswith(".cu")]
                assert len(cu) == 1, cu  # (compile_commands.json leaves the launcher out)
                assert "arch=compute_90a,code=[sm_90a]" in cu[0]["command"], cu[0]["command"]
            out = subprocess.run([str(build / "vllm_forge_cache_selftest")], capture_output=True, text=True)
            assert out.stdout.strip() == str(512 * 513 // 2)
            raw = subprocess.run([sccache, "--show-stats", "--stats-format", "json"], env=env, check=True,
                                 capture_output=True, text=True).stdout
            stats.append(json.loads(raw))
        first, second = stats
        assert str(first["cache_location"]).startswith("redis"), first["cache_location"]
        hits = second["stats"]["cache_hits"]["counts"]
        misses = first["stats"]["cache_misses"]["counts"]
        assert misses.get("C/C++", 0) >= 1 and hits.get("C/C++", 0) >= 1, (first, second)
        if NVCC:
            assert misses.get("CUDA", 0) >= 1 and hits.get("CUDA", 0) >= 1, (first, second)
    finally:
        subprocess.run([sccache, "--stop-server"], env=env, capture_output=True)
