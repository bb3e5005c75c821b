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
import stat
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable, Iterator
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


def one_error(r: subprocess.CompletedProcess[str], *parts: str) -> str:
    """The one error line of a refused command (exit 2, no traceback), `<what> -- <what to do>`, holding
    each of parts."""
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("vllm-forge: error:")]
    assert len(errors) == 1, r.stderr
    assert " -- " in errors[0], errors[0]
    for part in parts:
        assert part in errors[0], errors[0]
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


# ==================================================================================================
# --- issue 22 (boundary22): injection, the one error boundary, all-or-nothing outputs -------------
# Every test below failed before the fix (a traceback, a second line, a file left or replaced, or a
# hint pointing at the network). Malformed wheels are made from the real wheels' own members.
# ==================================================================================================

def derived_wheel(src: Path, dest: Path, edit: Callable[[dict[str, bytes]], None] | None = None,
                  prefixes: tuple[str, ...] = (".dist-info/", "vllm/vllm_flash_attn/cute/"),
                  record: bool = True) -> Path:
    """A wheel holding the members of the real wheel `src` that vllm-forge reads (dist-info, FA4 tree),
    after `edit`; RECORD regenerated for exactly those members unless record=False."""
    import base64

    with zipfile.ZipFile(src) as zf:
        di = next(n.split("/", 1)[0] for n in zf.namelist() if ".dist-info/" in n)
        members = {n: zf.read(n) for n in zf.namelist()
                   if any(p in n for p in prefixes) and not n.endswith("/RECORD")}
        members[f"{di}/RECORD"] = zf.read(f"{di}/RECORD")
    if record:
        rows = [f"{n},sha256={base64.urlsafe_b64encode(hashlib.sha256(d).digest()).decode().rstrip('=')},{len(d)}"
                for n, d in sorted(members.items()) if not n.endswith("/RECORD")]
        members[f"{di}/RECORD"] = ("\n".join([*rows, f"{di}/RECORD,,"]) + "\n").encode()
    if edit is not None:
        edit(members)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as out:
        for n, d in members.items():
            out.writestr(n, d)
    return dest


def _member(members: dict[str, bytes], leaf: str) -> str:
    return next(n for n in members if n.endswith(f".dist-info/{leaf}"))


WHEEL_EDITS: dict[str, Callable[[dict[str, bytes]], None]] = {
    "no METADATA": lambda m: m.pop(_member(m, "METADATA")),
    "non-UTF-8 METADATA": lambda m: m.update({_member(m, "METADATA"): b"Version: \xff\xfe\n"}),
    "no RECORD": lambda m: m.pop(_member(m, "RECORD")),
    "RECORD row of 2 fields": lambda m: m.update({_member(m, "RECORD"): m[_member(m, "RECORD")] + b"a.py,b\n"}),
    "RECORD row with a bad size": lambda m: m.update(
        {_member(m, "RECORD"): m[_member(m, "RECORD")] + b"a.py,sha256=AAAA,many\n"}),
    "stamp not JSON": lambda m: m.update({_member(m, "vllm_forge.json"): b"{not json"}),
    "stamp of another shape": lambda m: m.update({_member(m, "vllm_forge.json"): b'{"vllm": 5}'}),
    "stamp patches not objects": lambda m: m.update({_member(m, "vllm_forge.json"): json.dumps(
        {**json.loads(m[_member(m, "vllm_forge.json")]),
         "flash_attention": {**json.loads(m[_member(m, "vllm_forge.json")])["flash_attention"],
                             "patches": [7]}}).encode()}),
}


@pytest.mark.parametrize("edit", list(WHEEL_EDITS))
def test_verify_malformed_wheel(tmp_path: Path, forged: BuildResult, edit: str) -> None:
    bad = derived_wheel(forged.wheel, tmp_path / forged.wheel.name, WHEEL_EDITS[edit])
    err = one_error(run_cli("verify", "--quick", str(bad)))
    expect = {"no METADATA": "has no member", "non-UTF-8 METADATA": "is not UTF-8 text",
              "no RECORD": "has no member", "RECORD row of 2 fields": "RECORD of", "RECORD row with a bad size":
              "has a malformed row", "stamp not JSON": "is not JSON", "stamp of another shape": "is malformed",
              "stamp patches not objects": "is malformed"}[edit]
    assert expect in err and forged.wheel.name in err, err


@pytest.mark.parametrize("edit", ["no METADATA", "non-UTF-8 METADATA", "RECORD row of 2 fields"])
def test_build_malformed_base_wheel(tmp_path: Path, base_wheel: Path, fa_upstream: Path, edit: str) -> None:
    """--base-wheel made of the real 0.19.1 wheel's dist-info, FA members and the files the default build
    overlays, damaged."""
    def keep_record(m: dict[str, bytes]) -> None:
        WHEEL_EDITS[edit](m)

    from vllm_forge.overlay import gemma4_fa4_for, load_stack
    from vllm_forge.pins import layers_for, load_pins

    vp = load_pins().for_version("0.19.1")
    overlaid = load_stack(layers_for(vp.overlay, "bundled", gemma4_fa4_for(vp.version, None))).paths
    bad = derived_wheel(base_wheel, tmp_path / "in" / base_wheel.name, keep_record,
                        prefixes=(".dist-info/", "vllm/vllm_flash_attn/", *overlaid))
    out = tmp_path / "out"
    err = one_error(run_cli("build", "--out", str(out), "--base-wheel", str(bad), "--fa-src", str(fa_upstream)))
    assert bad.name in err or "RECORD" in err, err
    assert listing(out) == []


def test_bad_crc_in_a_member_read(tmp_path: Path, forged: BuildResult) -> None:
    """A copy of the real forged wheel with bytes flipped inside a FA4 member's compressed data."""
    bad = tmp_path / forged.wheel.name
    shutil.copyfile(forged.wheel, bad)
    with zipfile.ZipFile(bad) as zf:
        info = max((i for i in zf.infolist() if i.filename.startswith("vllm/vllm_flash_attn/cute/")),
                   key=lambda i: i.compress_size)
    with open(bad, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        f.seek(info.header_offset + 30 + name_len + extra_len + info.compress_size // 2)
        f.write(b"\x00\xff" * 8)
    err = one_error(run_cli("verify", "--quick", str(bad)))
    assert f"member {info.filename} of wheel {bad} is corrupt" in err


def test_not_a_wheel_file_name(tmp_path: Path, forged: BuildResult) -> None:
    """lock names the wheel by its file name (pip needs one); `build --base-wheel` names its output after
    the pinned name whatever the file is called (verify22), and verify refuses such a name itself."""
    (tmp_path / "forged.whl").symlink_to(forged.wheel)
    err = one_error(run_cli("lock", str(tmp_path / "forged.whl"), "--out", str(tmp_path / "l.txt"),
                            "--index-url", "http://127.0.0.1:9/simple/"))
    assert "wheel 'forged.whl' is not a wheel file name" in err
    assert listing(tmp_path) == ["forged.whl"]


def test_decompression_bomb_in_verify(tmp_path: Path, forged: BuildResult) -> None:
    """A FA4 member of 400 MB of zeros (400 kB compressed), listed in RECORD: refused before it is
    inflated; the verify process stays far below the member's size."""
    import base64

    zeros, chunk = 400 << 20, bytes(1 << 20)
    h = hashlib.sha256()
    for _ in range(zeros >> 20):
        h.update(chunk)
    row = f"vllm/vllm_flash_attn/cute/bomb.py,sha256={base64.urlsafe_b64encode(h.digest()).decode().rstrip('=')},{zeros}"

    def bomb(m: dict[str, bytes]) -> None:  # listed in RECORD: verify reads it like any FA4 member
        m[_member(m, "RECORD")] = row.encode() + b"\n" + m[_member(m, "RECORD")]

    bad = derived_wheel(forged.wheel, tmp_path / forged.wheel.name, bomb)
    with zipfile.ZipFile(bad, "a", zipfile.ZIP_DEFLATED) as zf, \
            zf.open("vllm/vllm_flash_attn/cute/bomb.py", "w", force_zip64=True) as f:
        for _ in range(zeros >> 20):
            f.write(chunk)
    # VmHWM: this process's own peak (ru_maxrss would include the forking pytest's before exec)
    code = ("import sys\nfrom vllm_forge.cli import main\nrc = main(sys.argv[1:])\n"
            "hwm = [ln for ln in open('/proc/self/status') if ln.startswith('VmHWM:')][0]\n"
            "print(hwm.split()[1], file=sys.stderr)\nsys.exit(rc)\n")
    r = subprocess.run([sys.executable, "-c", code, "verify", "--quick", str(bad)], capture_output=True, text=True,
                       check=False)
    peak_kb = int(r.stderr.strip().splitlines()[-1])
    assert peak_kb < 200_000, f"verify peaked at {peak_kb} kB for a {zeros} byte member"
    err = one_error(r)
    assert "member vllm/vllm_flash_attn/cute/bomb.py" in err and "decompression bomb" in err


@pytest.mark.parametrize("value", ["4354819200", "99999999999999999999999", "-1", "1e9", "١٢٣"])
def test_source_date_epoch_out_of_range(tmp_path: Path, value: str) -> None:
    """2108 and later (a zip date ends with 2107), huge, negative, not decimal ASCII: refused before
    any work, for each command that stamps times."""
    for cmd in (["build", "--out", str(tmp_path / "out")], ["build-fa4-wheel", "--out", str(tmp_path / "out")],
                ["docker", "--build", "--out", str(tmp_path / "out")]):
        err = one_error(run_cli(*cmd, env={"SOURCE_DATE_EPOCH": value}))
        assert "SOURCE_DATE_EPOCH=" in err and ("out of range" in err or "not an integer" in err), err
        assert listing(tmp_path) == []


def test_low_open_file_limit(tmp_path: Path, fa_upstream: Path) -> None:
    """ulimit -n too low for the imports (gitpython) and the work: one line naming ulimit -n."""
    def nofile() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (8, 8))

    r = subprocess.run([sys.executable, "-m", "vllm_forge.cli", "build", "--out", str(tmp_path / "out"),
                        "--fa-src", str(fa_upstream)], capture_output=True, text=True, preexec_fn=nofile,
                       check=False)
    err = one_error(r)
    assert "Too many open files" in err and "ulimit -n" in err and "network" not in err
    assert listing(tmp_path) == []


EMFILE_AT_CONNECT = """
import os, resource, sys
from vllm_forge.errors import ForgeError
from vllm_forge.fetch import Index
index = Index(sys.argv[1])
n = len(os.listdir("/proc/self/fd"))  # every descriptor now in use (the listing's own is closed again)
resource.setrlimit(resource.RLIMIT_NOFILE, (n - 1, n - 1))
try:
    index.files("vllm")
except ForgeError as e:
    print(e)
"""


def test_descriptor_limit_is_not_the_network(base_wheel: Path) -> None:
    """No descriptor left for the index's socket: the hint names ulimit -n, not the network."""
    with loopback_index(Served({base_wheel.name: base_wheel})) as url:
        r = subprocess.run([sys.executable, "-c", EMFILE_AT_CONNECT, url], capture_output=True, text=True,
                           check=False)
    assert "Too many open files" in r.stdout and "ulimit -n" in r.stdout, (r.stdout, r.stderr[-2000:])
    assert "network" not in r.stdout


def test_low_memory_limit(tmp_path: Path, base_wheel: Path, fa_upstream: Path) -> None:
    """ulimit -v from tight to enough: every run that got to work either succeeds or ends in one line
    naming the memory limit (MemoryError, or a thread without memory for its stack); some do."""
    refused = 0
    for kb in (40_000, 50_000, 60_000, 80_000):
        out = tmp_path / f"out{kb}"

        def limit(kb: int = kb) -> None:
            resource.setrlimit(resource.RLIMIT_AS, (kb << 10, kb << 10))

        r = subprocess.run([sys.executable, "-m", "vllm_forge.cli", "build", "--out", str(out), "--base-wheel",
                            str(base_wheel), "--fa-src", str(fa_upstream)], capture_output=True, text=True,
                           preexec_fn=limit, check=False)
        if r.returncode == 0 or "vllm-forge" not in r.stderr:  # enough, or the interpreter could not start
            continue
        err = one_error(r)
        assert "ulimit -v" in err, err
        assert listing(out) == []
        refused += 1
    assert refused, "no limit was tight enough to test anything"


def test_index_malformed_entries(tmp_path: Path, base_wheel: Path) -> None:
    """A PEP 691 page whose file entry lacks its url, or whose files are not objects."""
    for page in ({"files": [{"filename": base_wheel.name}]}, {"files": ["x"]}, {"files": {"a": 1}}):
        with loopback_index(Served({}, page=json.dumps(page).encode())) as url:
            err = one_error(run_cli("build", "--out", str(tmp_path / "out"), "--index-url", url,
                                    env={"VLLM_FORGE_CACHE": str(tmp_path / "cache")}))
        assert "gave no usable PEP 691 JSON page" in err
        assert listing(tmp_path / "out") == []


@pytest.mark.parametrize("content_range", ["bytes 0-0/*", "bytes 0-0/abc", "bytes 0-0/" + "9" * 30])
def test_index_malformed_content_range(tmp_path: Path, pins: Pins, content_range: str,
                                       monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The wheel mirror's range requests answered with an unusable Content-Range: the whole file is
    downloaded instead (sha256-checked), the FA4 tree delivered."""
    from conftest import real_wheel

    from vllm_forge.fa4 import from_wheel

    w = real_wheel(pins.fa.wheel_mirror.version)
    monkeypatch.setenv("VLLM_FORGE_CACHE", str(tmp_path / "cache"))
    with loopback_index(Served({w.name: w}, content_range=content_range)) as url:
        tree, mirror = from_wheel(pins.fa, lambda: Index(url), pins.index_project)
    assert len(tree) == pins.fa.cute_file_count and "range requests" not in mirror


@pytest.mark.parametrize("where", ["member", "tree", "fifo"])
def test_symlink_loop_in_cached_fa4_tree(tmp_path: Path, pins: Pins, fa_upstream: Path, wheel_mirror_index: str,
                                        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                        where: str) -> None:
    """A symlink loop in the cached FA4 tree (a member, or the tree's directory itself), or a FIFO in it:
    evicted and fetched again, the cache repaired."""
    cache = tmp_path / "cache"
    tree = cache / "fa4" / pins.fa.commit
    if where == "member":
        shutil.copytree(fa_upstream, tree)
        (tree / CUTE / "loop.py").symlink_to(tree / CUTE / "loop.py")
    elif where == "fifo":  # a FIFO among the files: reading it would block forever
        shutil.copytree(fa_upstream, tree)
        os.mkfifo(tree / CUTE / "loop.py")
    else:
        tree.parent.mkdir(parents=True)
        tree.symlink_to(tree)
    monkeypatch.setenv("VLLM_FORGE_CACHE", str(cache))
    for k, v in NO_GITHUB.items():
        monkeypatch.setenv(k, v)
    got = get_fa4_sources(pins.fa, tmp_path / "work", lambda: Index(wheel_mirror_index), pins.index_project,
                          patch_dir=tmp_path)
    assert f"vllm-forge: cached flash-attention tree {pins.fa.commit[:12]}" in capsys.readouterr().err
    assert got.mirror.startswith("wheel ") and got.pin_tree_sha256 == pins.fa.cute_tree_sha256
    assert tree.is_dir() and not tree.is_symlink() and not os.path.lexists(tree / CUTE / "loop.py")


def test_result_path_on_a_non_utf8_stdout(tmp_path: Path) -> None:
    """stdout that cannot spell the path (PYTHONIOENCODING=ascii): the path's own bytes are printed."""
    out = tmp_path / "dockér€"
    r = run_cli("docker", "--out", str(out), env={"PYTHONIOENCODING": "ascii"})
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "vllm_forge.cli", "docker", "--out", str(out)], capture_output=True,
                       env={**os.environ, "PYTHONIOENCODING": "ascii"}, check=False)
    assert r.returncode == 0 and r.stdout == os.fsencode(out / "Dockerfile") + b"\n", r.stderr[-2000:]


# --- injection -------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["9.0a$(touch {x})", "9.0a\"; touch {x}; \"", "9.0a`touch {x}`", "9.0a\ntouch {x}"])
def test_source_arch_injection(tmp_path: Path, arch: str) -> None:
    x = tmp_path / "X"
    err = one_error(run_cli("build", "--mode", "source", "--arch", arch.format(x=x), "--out", str(tmp_path / "out")))
    assert "is not a CUDA arch list" in err
    assert listing(tmp_path) == []


def test_build_script_quotes_every_value(tmp_path: Path) -> None:
    """forge-build.sh quotes what comes from files too (torch's pin from the sdist's requirements)."""
    from vllm_forge.source import build_script, check_arch

    assert check_arch("8.0;9.0a;10.0a+PTX") and check_arch("9.0a 12.0f")
    x = tmp_path / "X"
    script = tmp_path / "forge-build.sh"
    script.write_text(build_script(tool="0", version=f"$(touch {x})", commit="`touch X`", arch="9.0a",
                                   epoch=1, torch=f"'; touch {x}; '"))
    r = subprocess.run(["bash", str(script)], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"},
                       cwd=tmp_path, check=False)
    assert r.returncode != 0 and "VLLM_FLASH_ATTN_SRC_DIR" in r.stderr
    assert not x.exists() and not (tmp_path / "X").exists()


@pytest.mark.parametrize("src", ["ext::sh -c touch% {x}.git", "-u{x}.git", "fd::17", "https://h/fa\n.git"])
def test_fa_src_git_transport_injection(tmp_path: Path, src: str) -> None:
    """--fa-src taken as a git URL: only plain transports (git's `ext::` runs a command), no options."""
    x = tmp_path / "X"
    err = one_error(run_cli("build-fa4-wheel", "--out", str(tmp_path / "out"), f"--fa-src={src.format(x=x)}",
                            env={"VLLM_FORGE_CACHE": str(tmp_path / "cache"), "GIT_ALLOW_PROTOCOL": "ext:file"}))
    assert "is neither a directory nor a plain git URL" in err
    assert not x.exists() and listing(tmp_path) == []


@pytest.mark.parametrize("ref", ["x.whl\n--extra-index-url http://127.0.0.1:9/evil/", "x.whl\r--pre",
                                 "--extra-index-url=http://127.0.0.1:9/", "x.whl #comment", "${HOME}/x.whl",
                                 "my wheel.whl", ""])
def test_lock_wheel_ref_injection(tmp_path: Path, forged: BuildResult, ref: str) -> None:
    out = tmp_path / "l.txt"
    err = one_error(run_cli("lock", str(forged.wheel), "--out", str(out), f"--wheel-ref={ref}",
                            "--index-url", "http://127.0.0.1:9/simple/"))
    assert "--wheel-ref" in err and "plain path or URL" in err
    assert listing(tmp_path) == []


@pytest.mark.parametrize("kind", ["fifo", "socket", "directory"])
def test_outputs_that_are_not_regular_files(tmp_path: Path, forged: BuildResult, kind: str) -> None:
    """lock --out / docker's Dockerfile on a FIFO, a socket or a directory: refused, left as it was
    (as root, --out /dev/null used to become a regular file)."""
    out = tmp_path / "l.txt"
    docker_out = tmp_path / "d"
    docker_out.mkdir()
    sockets = []
    for path in (out, docker_out / "Dockerfile"):
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "socket":
            s = socket.socket(socket.AF_UNIX)
            s.bind(str(path))
            sockets.append(s)
        else:
            path.mkdir()
    try:
        err = one_error(run_cli("lock", str(forged.wheel), "--out", str(out), "--index-url",
                                "http://127.0.0.1:9/simple/"))
        assert str(out) in err and ("is a FIFO" in err or "is a socket" in err or "is a directory" in err), err
        err = one_error(run_cli("docker", "--out", str(docker_out)))
        assert "Dockerfile" in err and ("is a FIFO" in err or "is a socket" in err or "is a directory" in err), err
        for path in (out, docker_out / "Dockerfile"):
            mode = path.lstat().st_mode
            assert {"fifo": stat.S_ISFIFO, "socket": stat.S_ISSOCK, "directory": stat.S_ISDIR}[kind](mode)
        assert listing(docker_out) == ["Dockerfile"]
    finally:
        for s in sockets:
            s.close()


# --- left behind after a refusal -------------------------------------------------------------------

def test_docker_fa4_cache_refused_leaves_nothing(tmp_path: Path) -> None:
    (tmp_path / "cache").mkdir()
    err = one_error(run_cli("docker", "--out", str(tmp_path / "out"), "--fa4-cache", str(tmp_path / "cache")))
    assert "is not an FA4 kernel cache" in err
    assert listing(tmp_path) == ["cache"]


def test_build_manifest_unwritable_publishes_nothing(tmp_path: Path, base_wheel: Path, fa_upstream: Path) -> None:
    """The manifest's place is taken by a directory: neither the wheel nor the manifest is published."""
    out = tmp_path / "out"
    (out / (WHEEL_NAME[:-4] + ".manifest.json")).mkdir(parents=True)
    err = one_error(run_cli("build", "--out", str(out), "--base-wheel", str(base_wheel), "--fa-src", str(fa_upstream)))
    assert "manifest.json is a directory" in err
    assert listing(out) == [WHEEL_NAME[:-4] + ".manifest.json"]


def test_publish_together_undoes_the_first(tmp_path: Path) -> None:
    """The second rename fails: the first target gets its earlier content back (function)."""
    from vllm_forge.output import publish_together

    (tmp_path / "a").write_text("old a\n")
    (tmp_path / "ta").write_text("new a\n")
    (tmp_path / "tb").write_text("new b\n")
    (tmp_path / "sub").mkdir()
    with pytest.raises(OSError):
        publish_together([(tmp_path / "ta", tmp_path / "a"), (tmp_path / "tb", tmp_path / "sub" / "nodir" / "b")])
    assert (tmp_path / "a").read_text() == "old a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "sub", "tb"]


# --- arguments, hints, bugs ------------------------------------------------------------------------

@pytest.mark.parametrize("args", [["build", "--fa4", "nope"], ["build", "--no-such-flag"], ["fa4-cache", "--out", "x"],
                                  ["fa4-cache", "--model", "m", "--out", "x", "--layers", "two"], ["nope"], [],
                                  ["verify"], ["refresh", "--from", "0.19.1"], ["lock", "a", "b\nc"]])
def test_argument_errors_one_line(tmp_path: Path, args: list[str]) -> None:
    r = run_cli(*args)
    err = one_error(r)
    assert "see `vllm-forge" in err and "--help`" in err
    assert "usage:" not in r.stderr and r.stdout == ""


def test_broken_data_dir_is_not_a_network_problem(tmp_path: Path, base_wheel: Path, fa_upstream: Path) -> None:
    """VLLM_FORGE_DATA_DIR without CMakeLists.txt: every FA4 mirror fails in the same CMake step; the
    hint names the data directory, not the network."""
    data = data_copy(tmp_path)
    (data / "CMakeLists.txt").unlink()
    env = {"VLLM_FORGE_DATA_DIR": str(data), "VLLM_FLASH_ATTN_SRC_DIR": str(fa_upstream),
           "VLLM_FORGE_CACHE": str(tmp_path / "cache"), **NO_GITHUB}
    env["VLLM_FLASH_ATTN_SRC_DIR"] = str(fa_upstream)
    err = one_error(run_cli("build", "--out", str(tmp_path / "out"), "--base-wheel", str(base_wheel),
                            "--index-url", "http://127.0.0.1:9/simple/", env=env))
    assert "CMake FA4 component failed" in err and "VLLM_FORGE_DATA_DIR" in err and "network" not in err
    assert listing(tmp_path / "out") == []


BUG = """
import sys
import vllm_forge.docker as d
def broken(*args, **kwargs):
    return {}["no such key"]
d.render = broken
from vllm_forge.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_bug_is_one_line_with_its_traceback_kept(tmp_path: Path) -> None:
    """An exception no refusal covers (here a KeyError put into `docker`): one line saying it is a
    vllm-forge bug and where the traceback is; VLLM_FORGE_DEBUG=1 prints the traceback."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", BUG, "docker", "--out", str(tmp_path / "o")], capture_output=True,
                       text=True, env=env, check=False)
    err = one_error(r)
    assert "internal error (KeyError: 'no such key'): a vllm-forge bug" in err
    saved = [p for p in tmp_path.iterdir() if p.name.startswith("vllm-forge-bug-")]
    assert len(saved) == 1 and "Traceback" in saved[0].read_text() and str(saved[0]) in err
    r = subprocess.run([sys.executable, "-c", BUG, "docker", "--out", str(tmp_path / "o")], capture_output=True,
                       text=True, env={**env, "VLLM_FORGE_DEBUG": "1"}, check=False)
    assert r.returncode == 2 and "Traceback" in r.stderr and "a vllm-forge bug -- the traceback is above" in r.stderr
