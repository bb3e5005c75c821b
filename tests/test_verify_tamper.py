"""`verify` proves a wheel is what vllm-forge builds from the pinned inputs (issue 22).

A forger who changes a wheel can also make its own claims agree (RECORD rows, the stamp's tree
hash): each tampered wheel here carries a consistent RECORD, and verify must still name the member.
Real forged wheels: the 0.19.1 backport and the 0.22.1 tune release. Also: output tags from the
pinned wheel, not the name of the file given; the series manifest's patched tree hashes; patches
outside the FA4 tree; broken git mirrors in the cache.
"""

from __future__ import annotations

import base64
import copy
import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import real_wheel, run_cli, scratch
from loopback import Served, loopback_index
from test_hostile import PATCH, listing, one_error
from vllm_forge.build import build
from vllm_forge.errors import ForgeError
from vllm_forge.fa4 import WHEEL_CUTE, fa_target, get_fa4_sources, tree_sha256, zip_tree
from vllm_forge.fetch import Index, cached_download
from vllm_forge.pins import load_pins
from vllm_forge.series import read_manifest, series_for
from vllm_forge.verify import STAMP, verify_wheel

RELEASES = ["0.19.1", "0.22.1"]  # a backport and a tune release (its own FA pin + that pin's series)


@pytest.fixture(scope="module", params=RELEASES)
def forged_wheel(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    version = request.param
    if version == "0.19.1":
        yield request.getfixturevalue("forged").wheel
        return
    real_wheel(version)
    with scratch(tmp_path_factory, f"forged-{version}") as out:
        yield build(version, out).wheel


def _row(name: str, data: bytes) -> list[str]:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode().rstrip("=")
    return [name, f"sha256={digest}", str(len(data))]


def tamper(src: Path, dst: Path, change: dict[str, bytes | None]) -> Path:
    """A forger's copy of src: the members in `change` replaced, added (bytes) or removed (None), RECORD
    rewritten to agree; every other member copied as stored bytes (as a careful forger would)."""
    with zipfile.ZipFile(src) as zin, open(src, "rb") as fin, open(dst, "wb") as raw, \
            zipfile.ZipFile(raw, "w", zipfile.ZIP_DEFLATED) as zout:
        record = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
        rows = [r for r in csv.reader(io.StringIO(zin.read(record).decode())) if r and r[0] not in change]
        rows = [r for r in rows if r[0] != record]
        infos = sorted(zin.infolist(), key=lambda i: i.header_offset)
        ends = [i.header_offset for i in infos[1:]] + [zin.start_dir]
        for info, end in zip(infos, ends, strict=True):
            if info.filename in change or info.filename == record:
                continue
            clone = copy.copy(info)
            clone.header_offset = raw.tell()
            fin.seek(info.header_offset)
            left = end - info.header_offset
            while left:
                chunk = fin.read(min(left, 1 << 24))
                raw.write(chunk)
                left -= len(chunk)
            zout.filelist.append(clone)
            zout.NameToInfo[clone.filename] = clone
        zout.start_dir = raw.tell()
        zout._didModify = True  # type: ignore[attr-defined]
        for name, data in change.items():
            if data is not None:  # with the replaced member's date and mode (new ones: a plain file's)
                old = zin.NameToInfo.get(name)
                zi = zipfile.ZipInfo(name, old.date_time if old else (2026, 1, 1, 0, 0, 0))
                zi.external_attr = old.external_attr if old else 0o100644 << 16
                zout.writestr(zi, data, zipfile.ZIP_DEFLATED)
                rows.append(_row(name, data))
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows([*rows, [record, "", ""]])
        zout.writestr(record, buf.getvalue())
    return dst


def _stamp_name(zf: zipfile.ZipFile) -> str:
    return next(n for n in zf.namelist() if n.endswith(f".dist-info/{STAMP}"))


def forge_fa4_change(wheel: Path, dst: Path) -> Path:
    """(a) an FA4 file changed, its RECORD row and the stamp's tree_sha256 rewritten to match."""
    with zipfile.ZipFile(wheel) as zf:
        member = f"{WHEEL_CUTE}/interface.py"
        changed = zf.read(member) + b"\nimport os  # forged\n"
        tree = zip_tree(zf, WHEEL_CUTE)
        tree["interface.py"] = changed
        stamp_name = _stamp_name(zf)
        stamp = json.loads(zf.read(stamp_name))
    stamp["flash_attention"]["tree_sha256"] = tree_sha256(tree)
    return tamper(wheel, dst, {member: changed,
                               stamp_name: (json.dumps(stamp, indent=2, sort_keys=True) + "\n").encode()})


def _member(wheel: Path, name: str) -> bytes:
    with zipfile.ZipFile(wheel) as zf:
        return zf.read(name)


TAMPERINGS = {
    "fa4-file": (forge_fa4_change, f"{WHEEL_CUTE}/interface.py"),
    "extra-member": (lambda w, d: tamper(w, d, {"vllm/evil.py": b"import os\n"}), "vllm/evil.py"),
    "removed-member": (lambda w, d: tamper(w, d, {"vllm/envs.py": None}), "vllm/envs.py"),
    "base-member-payload": (lambda w, d: tamper(w, d, {"vllm/envs.py": _member(w, "vllm/envs.py")
                                                       + b"\nimport os; os.system('true')\n"}), "vllm/envs.py"),
}


@pytest.mark.parametrize("how", list(TAMPERINGS))
def test_verify_rejects_self_consistent_tampering(forged_wheel: Path, tmp_path: Path, how: str) -> None:
    """Each tampered wheel has a RECORD that agrees with it; the rebuild from the pinned inputs (the
    base wheel is in the cache) names the member, in one line, exit 2."""
    make, member = TAMPERINGS[how]
    bad = make(forged_wheel, tmp_path / forged_wheel.name)
    err = one_error(run_cli("verify", str(bad)))
    assert f"verify {forged_wheel.name}: {member} " in err, err
    # the forger's RECORD is consistent: only the pinned inputs catch it
    with pytest.raises(ForgeError, match=member.replace(".", r"\.")):
        verify_wheel(bad, deep=True)


def test_verify_passes_the_untouched_wheel_bit_for_bit(forged_wheel: Path) -> None:
    r = run_cli("verify", str(forged_wheel))
    assert r.returncode == 0, r.stderr
    assert "bit for bit identical to a rebuild from the pinned inputs" in r.stdout
    assert r.stdout.rstrip().endswith("verified (identical to a rebuild from the pinned inputs)")


def test_verify_without_the_base_says_self_consistency_only(forged_wheel: Path, tmp_path: Path) -> None:
    """--no-base (or no base wheel at hand): the FA4 tree is still checked against the series
    manifest (pinned data), and the report says it checked self-consistency only."""
    fa4 = forge_fa4_change(forged_wheel, _same_name(forged_wheel, tmp_path / "a"))
    err = one_error(run_cli("verify", "--no-base", str(fa4)))
    assert f"FA4 tree {WHEEL_CUTE}/" in err and "manifest.json" in err
    assert f"{WHEEL_CUTE}/interface.py differs from the pinned tree with the series applied" in err
    payload = TAMPERINGS["base-member-payload"][0](forged_wheel, _same_name(forged_wheel, tmp_path / "d"))
    r = run_cli("verify", "--no-base", str(payload))
    assert r.returncode == 0 and "verified (self-consistency only, --no-base)" in r.stdout
    empty_cache = {"VLLM_FORGE_CACHE": str(tmp_path / "empty-cache")}
    r = run_cli("verify", str(payload), env=empty_cache)
    assert r.returncode == 0 and "verified (self-consistency only, base wheel not available)" in r.stdout
    # the base given by hand: the rebuild names the member
    version = forged_wheel.name.split("-")[1].split("+")[0]
    err = one_error(run_cli("verify", "--base-wheel", str(real_wheel(version)), str(payload), env=empty_cache))
    assert "vllm/envs.py differs from what vllm-forge builds" in err


def _same_name(wheel: Path, d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    return d / wheel.name


def test_verify_base_wheel_must_be_the_pinned_one(forged_wheel: Path, tmp_path: Path) -> None:
    other = real_wheel("0.22.1" if "0.19.1" in forged_wheel.name else "0.19.1")
    err = one_error(run_cli("verify", "--base-wheel", str(other), str(forged_wheel)))
    assert "is not the pinned" in err


# --- mis-tag: the output's tags come from the pinned wheel, not the name of the file given ---------

def test_renamed_base_wheel_gives_the_pinned_tags(tmp_path: Path, base_wheel: Path, forged) -> None:
    renamed = tmp_path / "vllm-0.19.1-py3-none-any.whl"
    renamed.symlink_to(base_wheel)
    out = build("0.19.1", tmp_path / "out", base_wheel=renamed)
    assert out.wheel.name == forged.wheel.name
    assert out.wheel.read_bytes() == forged.wheel.read_bytes()


@pytest.mark.parametrize("tags", ["py3-none-any", "cp38-abi3-manylinux_2_17_x86_64"])
def test_verify_rejects_wheel_named_for_other_tags(forged_wheel: Path, tmp_path: Path, tags: str) -> None:
    real_tags = forged_wheel.name[:-4].split("-", 2)[2]
    bad = tmp_path / forged_wheel.name.replace(real_tags, tags)
    bad.symlink_to(forged_wheel)
    for args in ([], ["--no-base"], ["--quick"]):
        err = one_error(run_cli("verify", *args, str(bad)))
        assert f"file name tags {tags} are not the base wheel's ({real_tags}" in err, err


# --- the series manifest records each series' patched tree --------------------------------------

@pytest.mark.parametrize("pin_tree", sorted(read_manifest()["series"]), ids=lambda t: t[:7])
def test_manifest_records_the_patched_tree_applying_gives(pin_tree: str, tmp_path: Path) -> None:
    pins = load_pins()
    series = series_for(pin_tree)
    assert series is not None and series.patched_tree_sha256(), "every series records its patched tree"
    vpin = next(v for v in pins.vllm.values() if v.cute_tree_sha256 == pin_tree)
    fa = get_fa4_sources(fa_target(pins, vpin), tmp_path, lambda: Index(), pins.index_project)
    assert fa.patches and fa.tree_sha256 == series.patched_tree_sha256() != pin_tree


def test_stale_patched_record_is_not_used(tmp_path: Path) -> None:
    entry = next(iter(read_manifest()["series"].values()))
    series = series_for(next(iter(read_manifest()["series"])))
    assert series is not None
    stale = type(series)(series.pin_tree_sha256, series.commit, series.dir, None, None,
                         {"series": "0000000", "tree_sha256": entry["patched"]["tree_sha256"]})
    assert stale.patched_tree_sha256() is None
    assert series.patched_tree_sha256() == entry["patched"]["tree_sha256"]


# --- series patches outside the FA4 tree; broken git mirrors ------------------------------------

@pytest.mark.parametrize("target", ["flash_attn/other.py", "flash_attn/cute/README.md", "setup.py"])
def test_series_patch_outside_cute_refused(tmp_path: Path, fa_upstream: Path, target: str) -> None:
    """A change in no file of the wheel would be stamped as applied: refused before anything is written."""
    patches = tmp_path / "patches"
    patches.mkdir()
    (patches / "0001-elsewhere.patch").write_text(PATCH.format(a=target, b=target))
    (patches / "series").write_text("0001-elsewhere.patch\n")
    cache = tmp_path / "cache"
    err = one_error(run_cli("build", "--out", str(tmp_path / "out"), "--fa-src", str(fa_upstream),
                            "--fa-patches", str(patches), env={"VLLM_FORGE_CACHE": str(cache)}))
    assert f"patch 0001-elsewhere.patch touches '{target}', outside flash_attn/cute/*.py" in err
    assert listing(tmp_path / "out") == [] and not (cache / "fa4").exists()


@pytest.mark.parametrize("broken", ["file", "empty-dir", "foreign-dir", "git-dir-a-file"])
def test_broken_git_mirror_evicted_never_init_in_cwd(tmp_path: Path, broken: str) -> None:
    url = "http://127.0.0.1:9/fa.git"
    cache = tmp_path / "cache"
    mirror = cache / "git" / (hashlib.sha256(url.encode()).hexdigest()[:16] + ".git")
    mirror.parent.parent.mkdir(parents=True)
    if broken == "git-dir-a-file":
        mirror.parent.write_text("not a directory\n")
    elif broken == "file":
        mirror.parent.mkdir()
        mirror.write_text("not a repository\n")
    else:
        mirror.mkdir(parents=True)
        if broken == "foreign-dir":
            (mirror / "HEAD").write_text("ref: refs/heads/main\n")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    for run in range(2):  # the first run repairs the cache, the next finds it sound
        r = subprocess.run([sys.executable, "-m", "vllm_forge.cli", "build", "--out", str(tmp_path / "out"),
                            "--fa-src", url], capture_output=True, text=True, cwd=cwd, timeout=600, check=False,
                           env={**os.environ, "VLLM_FORGE_CACHE": str(cache)})
        assert "cannot reach git mirror" in one_error(r)
        assert listing(cwd) == [] and listing(tmp_path / "out") == []
        assert (mirror / "HEAD").is_file() and (mirror / "objects").is_dir()
        assert ("; evicted, " in r.stderr) == (run == 0), r.stderr


@pytest.mark.parametrize("broken", ["entry-a-dir", "dl-a-file"])
def test_broken_download_cache_slot_repaired(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str], broken: str) -> None:
    """Not only a corrupt file: whatever stands where a cached download belongs is evicted."""
    good = tmp_path / "srv" / "thing-1.0.tar.gz"
    good.parent.mkdir()
    good.write_bytes(os.urandom(100_000))
    sha = hashlib.sha256(good.read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    cache.mkdir()
    if broken == "dl-a-file":
        (cache / "dl").write_text("not a directory\n")
    else:
        (cache / "dl" / good.name / "sub").mkdir(parents=True)
    monkeypatch.setenv("VLLM_FORGE_CACHE", str(cache))
    with loopback_index(Served({good.name: good})) as url:
        got = cached_download(lambda: Index(url), "vllm", good.name, sha)
    assert got.read_bytes() == good.read_bytes()
    assert "evicted" in capsys.readouterr().err
