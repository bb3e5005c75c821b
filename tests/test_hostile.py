"""Hostile inputs and environments, every command: one line `vllm-forge: error: <what> -- <what to do>`,
exit 2, nothing left behind, and a later run that succeeds. Also: a cache that repairs itself, temp
files of killed builds removed by the next build, concurrent builds into one --out."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_cli
from loopback import Served, loopback_index

from vllm_forge.build import BuildResult
from vllm_forge.errors import ForgeError
from vllm_forge.fa4 import CUTE, get_fa4_sources
from vllm_forge.fetch import Index, cached_download
from vllm_forge.output import temp_prefix
from vllm_forge.pins import Pins, data_dir

WHEEL_NAME = "vllm-0.19.1+fa4.bce2942-cp38-abi3-manylinux_2_31_x86_64.whl"
NO_GITHUB = {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "url.http://127.0.0.1:9/.insteadOf",
             "GIT_CONFIG_VALUE_0": "https://github.com/", "VLLM_FLASH_ATTN_SRC_DIR": ""}


def one_error(r: subprocess.CompletedProcess[str]) -> str:
    """The one error line of a refused command (exit 2, no traceback), `<what> -- <what to do>`."""
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("vllm-forge: error:")]
    assert len(errors) == 1, r.stderr
    assert " -- " in errors[0], errors[0]
    return errors[0]


def listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def data_copy(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(data_dir(), data, ignore=shutil.ignore_patterns(".git", ".venv", "tests", "src", "dist",
                                                                   "build", "docs", "scripts"))
    return data


# --- 1. a cold cache must not break setuptools (the behaviour tests' torch import) -----------------

def test_index_leaves_setuptools_importable() -> None:
    """Constructing the default Index used to import pip, which (Python < 3.12) turns setuptools'
    distutils shim off for the process: `import setuptools` (torch.utils.cpp_extension) then asserted.
    That happened only with an empty download cache, so the behaviour tests failed on a fresh machine."""
    code = ("import sys\nfrom vllm_forge.fetch import Index\nIndex()\n"
            "assert 'pip' not in sys.modules, 'pip imported'\nimport setuptools\nprint('ok')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PIP_INDEX_URL", "VLLM_FORGE_INDEX_URL")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


# --- 2. --out that is a file, or cannot be created ---------------------------------------------

@pytest.mark.parametrize("cmd", ["build", "build-fa4-wheel", "docker"])
def test_out_is_a_file(tmp_path: Path, cmd: str) -> None:
    out = tmp_path / "out"
    out.write_text("a file\n")
    err = one_error(run_cli(cmd, "--out", str(out)))
    assert f"--out {out} exists and is not a directory" in err
    assert out.read_text() == "a file\n"


def test_out_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    err = one_error(run_cli("build", "--out", str(tmp_path / "f" / "out")))
    assert "a parent of it is a file" in err


def test_lock_out_under_a_file(tmp_path: Path, forged: BuildResult) -> None:
    (tmp_path / "f").write_text("")
    err = one_error(run_cli("lock", str(forged.wheel), "--out", str(tmp_path / "f" / "x.lock.txt"),
                            "--index-url", "http://127.0.0.1:9/simple/"))
    assert f"the directory of --out {tmp_path / 'f'} exists and is not a directory" in err
    err = one_error(run_cli("lock", str(forged.wheel), "--out", str(tmp_path / "f" / "sub" / "x.lock.txt")))
    assert "a parent of it is a file" in err


# --- 3. temp files of killed builds; concurrent builds -----------------------------------------

KILL_IN_REPACK = """
import os, signal, sys
import vllm_forge.build as b
real = b.assemble
def assemble_then_die(*args, **kwargs):
    real(*args, **kwargs)   # the .whl.part is complete on disk: the build dies as SIGKILL/OOM would
    os.kill(os.getpid(), signal.SIGKILL)
b.assemble = assemble_then_die
from vllm_forge.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_build_temp_removed_by_next_build(tmp_path: Path, base_wheel: Path, fa_upstream: Path) -> None:
    out = tmp_path / "out"
    args = ["build", "--out", str(out), "--base-wheel", str(base_wheel), "--fa-src", str(fa_upstream)]
    r = subprocess.run([sys.executable, "-c", KILL_IN_REPACK, *args], capture_output=True, text=True, check=False)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    left = [n for n in listing(out) if n.endswith(".whl.part")]
    assert len(left) == 1, listing(out)  # what a killed build leaves
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"removed 1 temp file(s) left in {out} by a build that was killed" in r.stderr
    assert listing(out) == sorted([WHEEL_NAME, WHEEL_NAME[:-4] + ".manifest.json"])


def test_live_build_temp_kept(tmp_path: Path, base_wheel: Path, fa_upstream: Path) -> None:
    """A temp file of a build that still runs (here: a live process's pid) is not touched."""
    out = tmp_path / "out"
    out.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        mine = temp_prefix().replace(f"p{os.getpid()}.", f"p{live.pid}.")
        (out / f"{mine}abcd.whl.part").write_bytes(b"in progress")
        r = run_cli("build", "--out", str(out), "--base-wheel", str(base_wheel), "--fa-src", str(fa_upstream))
        assert r.returncode == 0, r.stderr[-2000:]
        assert (out / f"{mine}abcd.whl.part").read_bytes() == b"in progress"
    finally:
        live.communicate(b"")


def test_concurrent_builds_into_one_out(tmp_path: Path, base_wheel: Path, fa_upstream: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "vllm_forge.cli", "build", "--out", str(out), "--base-wheel", str(base_wheel),
           "--fa-src", str(fa_upstream)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-1500:] for _, e in results]
    assert listing(out) == sorted([WHEEL_NAME, WHEEL_NAME[:-4] + ".manifest.json"])
    assert run_cli("verify", "--quick", str(out / WHEEL_NAME)).returncode == 0


# --- 4. a cache that repairs itself --------------------------------------------------------------

def test_cached_download_evicts_corrupt_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "srv" / "thing-1.0.tar.gz"
    good.parent.mkdir()
    good.write_bytes(os.urandom(200_000))
    sha = hashlib.sha256(good.read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    (cache / "dl").mkdir(parents=True)
    (cache / "dl" / good.name).write_bytes(b"bit rot")
    monkeypatch.setenv("VLLM_FORGE_CACHE", str(cache))
    with loopback_index(Served({good.name: good})) as url:
        got = cached_download(lambda: Index(url), "vllm", good.name, sha)
    assert got.read_bytes() == good.read_bytes()
    assert f"vllm-forge: cached {good.name} failed its sha256; evicted, downloading again" in capsys.readouterr().err


def test_corrupt_cached_base_wheel_repaired(tmp_path: Path, base_wheel: Path, fa_upstream: Path) -> None:
    """build's own path (the base's sha256 is checked during the repack): a truncated cached base is
    evicted, downloaded again from the index, verified, and the build succeeds."""
    cache = tmp_path / "cache"
    (cache / "dl").mkdir(parents=True)
    with open(base_wheel, "rb") as src:
        (cache / "dl" / base_wheel.name).write_bytes(src.read(3_000_000))
    out = tmp_path / "out"
    with loopback_index(Served({base_wheel.name: base_wheel})) as url:
        r = run_cli("build", "--out", str(out), "--index-url", url, "--fa-src", str(fa_upstream),
                    env={"VLLM_FORGE_CACHE": str(cache)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"vllm-forge: cached {base_wheel.name} failed its sha256; evicted, downloading again" in r.stderr
    assert (cache / "dl" / base_wheel.name).stat().st_size == base_wheel.stat().st_size
    assert listing(out) == sorted([WHEEL_NAME, WHEEL_NAME[:-4] + ".manifest.json"])


@pytest.fixture
def wheel_mirror_index(pins: Pins) -> Iterator[str]:
    """The index serving the real vLLM 0.22.0 wheel (FA4's wheel mirror), with byte ranges."""
    from conftest import real_wheel

    w = real_wheel(pins.fa.wheel_mirror.version)
    with loopback_index(Served({w.name: w})) as url:
        yield url


def test_tampered_fa4_cache_tree_evicted_and_refetched(tmp_path: Path, pins: Pins, fa_upstream: Path,
                                                      wheel_mirror_index: str, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "cache"
    tree = cache / "fa4" / pins.fa.commit
    shutil.copytree(fa_upstream, tree)
    with open(tree / CUTE / "softmax.py", "a") as f:
        f.write("# tampered\n")
    monkeypatch.setenv("VLLM_FORGE_CACHE", str(cache))
    for k, v in NO_GITHUB.items():
        monkeypatch.setenv(k, v)
    got = get_fa4_sources(pins.fa, tmp_path / "work", lambda: Index(wheel_mirror_index), pins.index_project,
                          patch_dir=tmp_path)
    err = capsys.readouterr().err
    assert (f"vllm-forge: cached flash-attention tree {pins.fa.commit[:12]} failed its tree hash; evicted, "
            "fetching from the next mirror") in err
    assert got.mirror.startswith("wheel ") and got.pin_tree_sha256 == pins.fa.cute_tree_sha256
    assert "# tampered" not in (tree / CUTE / "softmax.py").read_text()  # re-stored from the good mirror


def test_corrupt_cached_wheel_mirror_evicted(tmp_path: Path, pins: Pins, wheel_mirror_index: str,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from vllm_forge.fa4 import from_wheel

    cache = tmp_path / "cache"
    (cache / "dl").mkdir(parents=True)
    bad = cache / "dl" / pins.fa.wheel_mirror.wheel
    bad.write_bytes(b"PK\x05\x06" + b"\x00" * 18)  # an empty zip: not the pinned wheel
    monkeypatch.setenv("VLLM_FORGE_CACHE", str(cache))
    tree, mirror = from_wheel(pins.fa, lambda: Index(wheel_mirror_index), pins.index_project)
    assert len(tree) == pins.fa.cute_file_count and "range requests" in mirror
    assert f"vllm-forge: cached {bad.name} failed its sha256; evicted" in capsys.readouterr().err
    assert not bad.exists()


# --- 5. an unreachable git mirror is not a missing commit ---------------------------------------

def test_unreachable_git_mirror(tmp_path: Path) -> None:
    err = one_error(run_cli("build", "--out", str(tmp_path / "out"), "--fa-src", "http://127.0.0.1:9/fa.git",
                            env={"VLLM_FORGE_CACHE": str(tmp_path / "cache")}))
    assert "cannot reach git mirror http://127.0.0.1:9/fa.git" in err
    assert "not found" not in err
    assert listing(tmp_path / "out") == []


# --- full disk, file size limit, read-only filesystem --------------------------------------------

def _fsize_limit(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_file_size_limit_during_repack(tmp_path: Path, base_wheel: Path, fa_upstream: Path) -> None:
    """RLIMIT_FSIZE (ulimit -f) stops the repack with EFBIG: one line, nothing in --out; then it works."""
    out = tmp_path / "out"
    args = [sys.executable, "-m", "vllm_forge.cli", "build", "--out", str(out), "--base-wheel", str(base_wheel),
            "--fa-src", str(fa_upstream)]
    r = subprocess.run(args, capture_output=True, text=True, preexec_fn=lambda: _fsize_limit(50 << 20), check=False)
    err = one_error(r)
    assert "File too large" in err and "ulimit -f" in err
    assert listing(out) == []
    assert run_cli(*args[3:]).returncode == 0


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs (root only): a disk that fills up during the repack."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)],
                                           capture_output=True, check=False).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_disk_full_during_repack(small_fs: Path, base_wheel: Path, fa_upstream: Path) -> None:
    out = small_fs / "out"
    err = one_error(run_cli("build", "--out", str(out), "--base-wheel", str(base_wheel), "--fa-src",
                            str(fa_upstream)))
    assert "No space left on device" in err and "free space" in err
    assert listing(small_fs) == []  # not even the --out it created


def test_read_only_out(small_fs: Path, fa_upstream: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    err = one_error(run_cli("build-fa4-wheel", "--out", str(small_fs / "out"), "--fa-src", str(fa_upstream)))
    assert f"cannot create --out {small_fs / 'out'}: Read-only file system" in err


# --- interrupted downloads ----------------------------------------------------------------------

def test_download_cut_mid_body(tmp_path: Path, base_wheel: Path, fa_upstream: Path) -> None:
    """The index drops the connection after 2 MB of the base wheel: one line, no partial file in the
    cache or --out; with the connection back, the same command works."""
    cache = tmp_path / "cache"
    served = Served({base_wheel.name: base_wheel}, cut_after=2_000_000)
    with loopback_index(served) as url:
        args = ["build", "--out", str(tmp_path / "out"), "--index-url", url, "--fa-src", str(fa_upstream)]
        err = one_error(run_cli(*args, env={"VLLM_FORGE_CACHE": str(cache)}))
        assert f"the download of {base_wheel.name}" in err and "was cut off after 2000000 of" in err
        assert listing(cache / "dl") == []  # no partial file in the cache
        assert listing(tmp_path / "out") == []
        served.cut_after = None
        r = run_cli(*args, env={"VLLM_FORGE_CACHE": str(cache)})
        assert r.returncode == 0, r.stderr[-2000:]
    assert listing(cache / "dl") == [base_wheel.name]


def test_index_serves_garbage(tmp_path: Path) -> None:
    """An --index-url that answers, but not with PEP 691 JSON."""
    with loopback_index(Served({}, page=b"<html>not json</html>")) as url:
        err = one_error(run_cli("build", "--out", str(tmp_path / "out"), "--index-url", url,
                                env={"VLLM_FORGE_CACHE": str(tmp_path / "cache")}))
    assert f"the package index at {url}vllm/ gave no usable PEP 691 JSON page" in err
    assert listing(tmp_path / "out") == []
