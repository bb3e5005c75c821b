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
from conftest import copy_data, run_cli
from loopback import Served, loopback_index

from vllm_forge.build import BuildResult
from vllm_forge.errors import ForgeError
from vllm_forge.fa4 import CUTE, get_fa4_sources
from vllm_forge.fetch import Index, cached_download
from vllm_forge.pins import Pins, data_dir

WHEEL_NAME = "vllm-0.19.1+fa4.bce2942.p952cdd5.gemma4-cp38-abi3-manylinux_2_31_x86_64.whl"
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
    return copy_data(tmp_path / "data")


# --- 1. a cold cache must not break setuptools (the behaviour tests' torch import) -----------------

def test_index_leaves_setuptools_importable() -> None:
    """Constructing the default Index used to import pip, which (Python < 3.12) turns setuptools'
    distutils shim off for the process: `import setuptools` (torch.utils.cpp_extension) then asserted.
    That happened only with an empty download cache, so the behaviour tests failed on a fresh machine."""
    import importlib.util

    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("no setuptools in this environment")
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
    assert listing(out) == sorted([WHEEL_NAME, WHEEL_NAME[:-4] + ".manifest.json", WHEEL_NAME[:-4] + ".intoto.json"])


def test_live_build_temp_kept(tmp_path: Path, base_wheel: Path, fa_upstream: Path) -> None:
    """A temp file of a build that still runs (here: a live process's pid) is not touched."""
    out = tmp_path / "out"
    out.mkdir()
    from vllm_forge.output import temp_prefix

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
    assert listing(out) == sorted([WHEEL_NAME, WHEEL_NAME[:-4] + ".manifest.json", WHEEL_NAME[:-4] + ".intoto.json"])
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
    assert listing(out) == sorted([WHEEL_NAME, WHEEL_NAME[:-4] + ".manifest.json", WHEEL_NAME[:-4] + ".intoto.json"])


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
    (small_fs / "exists").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    err = one_error(run_cli("build-fa4-wheel", "--out", str(small_fs / "out"), "--fa-src", str(fa_upstream)))
    assert f"cannot create --out {small_fs / 'out'}: Read-only file system" in err
    err = one_error(run_cli("build-fa4-wheel", "--out", str(small_fs / "exists"), "--fa-src", str(fa_upstream)))
    assert f"cannot write in --out {small_fs / 'exists'}: Read-only file system -- that filesystem is read-only" in err


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


# --- malformed data files (VLLM_FORGE_DATA_DIR points at a damaged copy) ---------------------------

def _pins_edit(data: Path, edit: str) -> None:
    pins = json.loads((data / "pins.json").read_text())
    if edit == "escaping wheel name":
        pins["vllm"]["0.19.1"]["wheel"] = "../../../../tmp/evil.whl"
    elif edit == "short sha256":
        pins["vllm"]["0.19.1"]["wheel_sha256"] = "abc"
    elif edit == "missing key":
        del pins["flash_attention"]["commit"]
    elif edit == "wrong type":
        pins["vllm"] = ["0.19.1"]
    (data / "pins.json").write_text(json.dumps(pins))


@pytest.mark.parametrize("edit", ["not json", "escaping wheel name", "short sha256", "missing key", "wrong type"])
def test_malformed_pins(tmp_path: Path, edit: str) -> None:
    data = data_copy(tmp_path)
    if edit == "not json":
        (data / "pins.json").write_text('{"default_vllm": "0.19.1",')
    else:
        _pins_edit(data, edit)
    for cmd in (["build", "--out", str(tmp_path / "out")], ["docker", "--out", str(tmp_path / "out")],
                ["refresh", "--from", "0.19.1", "--to", "0.18.1"]):
        err = one_error(run_cli(*cmd, env={"VLLM_FORGE_DATA_DIR": str(data)}))
        assert f"cannot read pins file {data / 'pins.json'}" in err and "VLLM_FORGE_DATA_DIR" in err
        assert listing(tmp_path / "out") == []


@pytest.mark.parametrize("edit", ["not json", "patch outside", "wheel path outside", "missing patch"])
def test_malformed_overlay_manifest(tmp_path: Path, edit: str) -> None:
    data = data_copy(tmp_path)
    path = data / "vllm_overlay" / "manifest.json"
    if edit == "not json":
        path.write_text("{")
    else:
        m = json.loads(path.read_text())
        files = m["overlays"]["fa4-sm90-hd512"]["files"]
        key = next(iter(files))
        if edit == "patch outside":
            files[key] = "../../../etc/passwd"
        elif edit == "wheel path outside":
            files["../../../tmp/evil.py"] = files.pop(key)
        else:
            files[key] = "fa4-sm90-hd512/gone.patch"
        path.write_text(json.dumps(m))
    err = one_error(run_cli("build", "--out", str(tmp_path / "out"), env={"VLLM_FORGE_DATA_DIR": str(data)}))
    expect = {"not json": "cannot read the overlay manifest", "patch outside": "leaves its tree",
              "wheel path outside": "leaves its tree", "missing patch": "which is not a file in"}[edit]
    assert expect in err
    assert listing(tmp_path / "out") == []


PATCH = """--- a/{a}
+++ b/{b}
@@ -1,1 +1,1 @@
-x
+y
"""


@pytest.mark.parametrize("target", ["../../outside.py", "/tmp/absolute.py", "flash_attn/../../../x.py"])
def test_patch_outside_the_tree(tmp_path: Path, fa_upstream: Path, target: str) -> None:
    patches = tmp_path / "patches"
    patches.mkdir()
    (patches / "0001-escape.patch").write_text(PATCH.format(a=target, b=target))  # a//tmp/..: absolute
    (patches / "series").write_text("0001-escape.patch\n")
    err = one_error(run_cli("build", "--out", str(tmp_path / "out"), "--fa-src", str(fa_upstream),
                            "--fa-patches", str(patches)))
    assert "patch 0001-escape.patch touches" in err and "outside the tree it patches" in err
    assert listing(tmp_path / "out") == []
    assert not (tmp_path / "outside.py").exists()


def test_patch_absolute_path_without_prefix(tmp_path: Path) -> None:
    from vllm_forge.patching import check_paths

    p = tmp_path / "abs.patch"
    p.write_text("--- /etc/hostname\n+++ /etc/hostname\n@@ -1 +1 @@\n-a\n+b\n")
    with pytest.raises(ForgeError, match="touches '/etc/hostname', outside the tree"):
        check_paths(p)
    p.write_text("diff --git a/x b/x\nnew file mode 120000\n--- /dev/null\n+++ b/x\n@@ -0,0 +1 @@\n+/etc\n")
    with pytest.raises(ForgeError, match="makes a symbolic link"):
        check_paths(p)
    p.write_text(PATCH.format(a="flash_attn/cute/x.py", b="flash_attn/cute/x.py"))
    assert check_paths(p) == ["flash_attn/cute/x.py", "flash_attn/cute/x.py"]


@pytest.mark.parametrize("entry", ["../escape.patch", "/etc/passwd", "missing.patch"])
def test_malformed_series(tmp_path: Path, fa_upstream: Path, entry: str) -> None:
    patches = tmp_path / "patches"
    patches.mkdir()
    (tmp_path / "escape.patch").write_text(PATCH.format(a="flash_attn/cute/x.py", b="flash_attn/cute/x.py"))
    (patches / "series").write_text(f"# comment\n{entry}\n")
    err = one_error(run_cli("build-fa4-wheel", "--out", str(tmp_path / "out"), "--fa-src", str(fa_upstream),
                            "--fa-patches", str(patches)))
    assert f"series lists {entry!r}, which is not a file of" in err or "which does not exist" in err
    assert listing(tmp_path / "out") == []


def test_fa_patches_dir_missing(tmp_path: Path, fa_upstream: Path) -> None:
    err = one_error(run_cli("build-fa4-wheel", "--out", str(tmp_path / "out"), "--fa-src", str(fa_upstream),
                            "--fa-patches", str(tmp_path / "nope")))
    assert f"flash-attention patch directory {tmp_path / 'nope'} does not exist" in err


# --- links and member names that escape ------------------------------------------------------------

def test_fa_src_symlink_escapes(tmp_path: Path, fa_upstream: Path) -> None:
    src = tmp_path / "fa"
    shutil.copytree(fa_upstream, src)
    (tmp_path / "secret.py").write_text("SECRET = 1\n")
    (src / CUTE / "leak.py").symlink_to(tmp_path / "secret.py")
    err = one_error(run_cli("build-fa4-wheel", "--out", str(tmp_path / "out"), "--fa-src", str(src)))
    assert "leak.py in local checkout" in err and "links outside" in err
    assert listing(tmp_path / "out") == []


@pytest.mark.parametrize("member", ["symlink", "dotdot", "absolute"])
def test_sdist_member_escapes(tmp_path: Path, member: str) -> None:
    from vllm_forge.source import _extract

    sdist = tmp_path / "vllm-0.0.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        info = tarfile.TarInfo("vllm-0.0.0/setup.py")
        info.size = 0
        tf.addfile(info)
        if member == "symlink":
            link = tarfile.TarInfo("vllm-0.0.0/evil")
            link.type, link.linkname = tarfile.SYMTYPE, "/etc"
            tf.addfile(link)
        else:
            bad = tarfile.TarInfo("../evil.py" if member == "dotdot" else "/tmp/evil.py")
            bad.size = 0
            tf.addfile(bad)
    with pytest.raises(ForgeError, match="link member|unsafe archive member name"):
        _extract(sdist, tmp_path / "x")
    assert not (tmp_path / "evil.py").exists() and not (tmp_path / "x" / "vllm-0.0.0" / "evil").exists()


# --- every command, bad arguments -------------------------------------------------------------------

def test_verify_bad_arguments(tmp_path: Path) -> None:
    assert "does not exist" in one_error(run_cli("verify", str(tmp_path / "nope.whl")))
    (tmp_path / "d.whl").mkdir()
    assert "does not exist" in one_error(run_cli("verify", str(tmp_path / "d.whl")))
    junk = tmp_path / "vllm-0.19.1+fa4.bce2942.p952cdd5.gemma4-cp38-abi3-manylinux_2_31_x86_64.whl"
    junk.write_bytes(b"not a zip")
    one_error(run_cli("verify", str(junk)))
    with zipfile.ZipFile(junk, "w") as zf:
        zf.writestr("../../evil.py", "x")
    one_error(run_cli("verify", str(junk)))


def test_lock_bad_arguments(tmp_path: Path, forged: BuildResult) -> None:
    assert "does not exist" in one_error(run_cli("lock", str(tmp_path / "nope.whl")))
    err = one_error(run_cli("lock", str(forged.wheel), "--out", str(tmp_path / "l.txt"),
                            "--python", str(tmp_path / "no-python")))
    assert "cannot run" in err and "--python" in err
    (tmp_path / "dir").mkdir()
    assert "is a directory" in one_error(run_cli("lock", str(forged.wheel), "--out", str(tmp_path / "dir")))
    err = one_error(run_cli("lock", str(forged.wheel), "--out", str(tmp_path / "l.txt"), "--sbom-out", str(tmp_path / "dir")))
    assert "--sbom-out" in err and "is a directory" in err
    (tmp_path / "f").write_text("x")
    err = one_error(run_cli("lock", str(forged.wheel), "--out", str(tmp_path / "l.txt"),
                            "--dependencies-out", str(tmp_path / "f" / "deps.txt")))
    assert "the directory of --dependencies-out" in err and "exists and is not a directory" in err
    (tmp_path / "f").unlink()
    assert listing(tmp_path) == ["dir"]


def test_docker_bad_arguments(tmp_path: Path) -> None:
    assert "unknown vLLM version '9.9.9'" in one_error(run_cli("docker", "--vllm", "9.9.9", "--out",
                                                                   str(tmp_path / "o")))
    data = data_copy(tmp_path)
    (data / "docker" / "Dockerfile.in").unlink()
    err = one_error(run_cli("docker", "--out", str(tmp_path / "o"), env={"VLLM_FORGE_DATA_DIR": str(data)}))
    assert "cannot read the Dockerfile template" in err
    assert listing(tmp_path) == ["data"]


def test_refresh_bad_arguments(tmp_path: Path) -> None:
    err = one_error(run_cli("refresh", "--from", "0.19.1", "--to", "0.18.1", "--data-dir", str(tmp_path / "nope")))
    assert "cannot read pins file" in err
    assert "unknown vLLM version '7.0'" in one_error(run_cli("refresh", "--from", "7.0", "--to", "0.18.1",
                                                               "--data-dir", str(data_copy(tmp_path))))


def test_build_bad_arguments(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert "does not exist" in one_error(run_cli("build", "--out", str(out), "--base-wheel", str(tmp_path / "x")))
    assert "is not an integer" in one_error(run_cli("build", "--out", str(out), env={"SOURCE_DATE_EPOCH": "x"}))
    err = one_error(run_cli("build", "--out", str(out), "--fa-src", str(tmp_path / "no-fa")))
    assert "does not exist" in err
    assert listing(tmp_path) == []


def test_sigterm_cleans_up(tmp_path: Path, base_wheel: Path, fa_upstream: Path) -> None:
    """SIGTERM (a scheduler, `timeout`) during the repack: temp files removed, exit 143."""
    code = KILL_IN_REPACK.replace("signal.SIGKILL", "signal.SIGTERM")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-c", code, "build", "--out", str(out), "--base-wheel", str(base_wheel),
                        "--fa-src", str(fa_upstream)], capture_output=True, text=True, check=False)
    assert r.returncode == 143 and "vllm-forge: terminated" in r.stderr, r.stderr[-2000:]
    assert listing(tmp_path) == []  # --out was created by the build and removed with its temp files


def test_host_of_temp_names(tmp_path: Path) -> None:
    """Temp names carry this host's tag: a dead pid's temp from another host is left alone."""
    from vllm_forge.output import remove_stale_temps, temp_prefix

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    here = temp_prefix().replace(f"p{os.getpid()}.", f"p{dead}.")
    other = f".vllm-forge-p{dead}.{hashlib.sha256(b'other-' + socket.gethostname().encode()).hexdigest()[:8]}."
    (tmp_path / f"{here}x.whl.part").write_bytes(b"")
    (tmp_path / f"{other}x.whl.part").write_bytes(b"")
    (tmp_path / f"{here}y.d").mkdir()
    assert sorted(remove_stale_temps(tmp_path)) == sorted([f"{here}x.whl.part", f"{here}y.d"])
    assert listing(tmp_path) == [f"{other}x.whl.part"]


def test_refresh_read_only_data_dir(small_fs: Path) -> None:
    """refresh writing into a read-only data dir: one line, the data dir unchanged; writable, it works."""
    data = small_fs / "data"
    shutil.copytree(data_dir() / "vllm_overlay", data / "vllm_overlay")
    pins = json.loads((data_dir() / "pins.json").read_text())
    pins["vllm"]["0.18.1"]["overlay"] = "fa4-sm90-hd512"  # as before 0.18.1 had its own overlay
    (data / "pins.json").write_text(json.dumps(pins, indent=2) + "\n")
    before = {p: p.read_bytes() for p in data.rglob("*") if p.is_file()}
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    args = ("refresh", "--from", "0.19.1", "--to", "0.18.1", "--data-dir", str(data))
    err = one_error(run_cli(*args))
    assert "Read-only file system" in err and "read-only; choose a writable path" in err
    assert {p: p.read_bytes() for p in data.rglob("*") if p.is_file()} == before
    subprocess.run(["mount", "-o", "remount,rw", str(small_fs)], check=True)
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((data / "pins.json").read_text())["vllm"]["0.18.1"]["overlay"] == "fa4-sm90-hd512@0.18.1"
    assert not [p for p in data.rglob(".*.part")]
