"""`vllm-forge pin X`: resolve a vLLM release from the package index into release data (a pins.json entry).

For a release: the cp38-abi3 manylinux wheel pip would install per platform (x86_64, aarch64; the
highest build tag), the sdist; from the sdist the flash-attention GIT_TAG, the torch pin and FA4's
requirement lines; from the x86_64 wheel (HTTP range requests only) the `vllm/vllm_flash_attn/cute`
tree hash (fa4.tree_sha256), the backport base files and whether they carry vLLM PR #38835
(overlay.carries_fix), which decides the plan; from each other platform's wheel its RECORD (range
requests), whose sha256 of every .py file is compared with the x86_64 wheel's: the plans apply to
that platform unchanged only where they are identical (what differs is recorded).

`vllm-forge pin` writes the entry (and, for a tune release whose FA pin has no series, the series of
the nearest pinned release ported by three-way merge) into the user data directory, layered over the
shipped pins (pins.load_pins); scripts/pin_releases.py runs the same code over the shipped releases.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from .errors import ForgeError
from .fa4 import CUTE, UPSTREAM_PKG, VLLM_PKG, WHEEL_CUTE, cmake_install_fa4, tree_sha256
from .fetch import Index, cache_dir, cached_download
from .overlay import carries_fix, read_manifest, sha256
from .pins import PLATFORMS, USER_PINS, Pins, load_pins, version_key

PROJECT = "vllm"
BASES = ("vllm/v1/attention/backends/flash_attn.py", "vllm/v1/attention/backends/fa_utils.py",
         "vllm/vllm_flash_attn/flash_attn_interface.py")
FA4_REQS = {"nvidia-cutlass-dsl", "quack-kernels", "apache-tvm-ffi", "torch-c-dlpack-ext", "einops"}
BACKPORT_PREFIX = "fa4-sm90-hd512"  # the backport overlay family (vllm_overlay/)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pick_wheel(index: Index, version: str, platform: str = "x86_64") -> tuple[str, str] | None:
    """The `platform` cp38-abi3 manylinux wheel pip would install, and why (None: the release has none)."""
    found = []
    for name in index.files(PROJECT):
        if not name.endswith(".whl"):
            continue
        try:
            _, ver, build, tags = parse_wheel_filename(name)
        except (InvalidWheelFilename, InvalidVersion):
            continue
        if ver == Version(version) and any(t.interpreter == "cp38" and t.abi == "abi3" and
                                           re.fullmatch(rf"manylinux_\d+_\d+_{platform}", t.platform) for t in tags):
            found.append((build, name))
    if not found:
        return None
    found.sort()
    (build, name), others = found[-1], found[:-1]
    if not others:
        return name, f"only {platform} wheel"
    if others[-1][0] == build:
        raise ForgeError(f"vLLM {version}: several {platform} wheels with one build tag: {[n for _, n in found]}",
                         "pin this release by hand in pins.json")
    rest = ", ".join(f"build tag {b[0]}" if b else "the untagged upload" for b, _ in others)
    return name, f"build tag {build[0] if build else 'none'} over {rest}: pip prefers the highest build tag"


def entry_sha(index: Index, filename: str) -> str:
    e = index.files(PROJECT).get(filename)
    hashes = e.get("hashes") if e else None
    sha = hashes.get("sha256") if isinstance(hashes, dict) else None
    if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise ForgeError(f"the package index {index.url} lists no sha256 for {filename}",
                         "use an index that lists sha256 hashes (PyPI's simple API does)")
    return sha


def _read_members(index: Index, wheel: str, sha: str, kind: str, pick: Any) -> Path:
    """Members of a remote wheel chosen by pick(infos) -> groups, read by range requests, cached as a small zip."""
    path = cache_dir() / "pin-releases" / f"{wheel}.{sha[:16]}.{kind}.zip"
    if path.is_file():
        return path
    remote = index.open_remote(PROJECT, wheel, sha)
    zf = zipfile.ZipFile(remote)  # type: ignore[arg-type]
    infos = sorted(zf.infolist(), key=lambda i: i.header_offset)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as out:
            for group in filter(None, pick(infos)):  # one request per contiguous span
                remote.prefetch_members(zf, group)
                for i in group:
                    out.writestr(i.filename, zf.read(i))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log(f"  {wheel}: {remote.fetched / 1e6:.1f} MB by range requests")
    return path


def wheel_members(index: Index, wheel: str, sha: str) -> Path:
    """The wheel's cute tree, base files, METADATA and RECORD."""
    def pick(infos: list[zipfile.ZipInfo]) -> list[list[zipfile.ZipInfo]]:
        cute = [i for i in infos if i.filename.startswith(WHEEL_CUTE + "/") and not i.is_dir()]
        meta = [i for i in infos if re.fullmatch(r"vllm-[^/]+\.dist-info/(METADATA|RECORD)", i.filename)]
        return [cute] + [[i] for i in infos if i.filename in BASES] + [meta]
    return _read_members(index, wheel, sha, "members", pick)


def wheel_record(index: Index, wheel: str, sha: str) -> dict[str, str]:
    """RECORD of a remote wheel: path -> its sha256 (hex)."""
    zpath = _read_members(index, wheel, sha, "record", lambda infos: [
        [i for i in infos if re.fullmatch(r"vllm-[^/]+\.dist-info/RECORD", i.filename)]])
    with zipfile.ZipFile(zpath) as zf:
        return parse_record(next(zf.read(n) for n in zf.namelist() if n.endswith("RECORD")))


def parse_record(data: bytes) -> dict[str, str]:
    import base64
    import csv
    import io

    out = {}
    for row in csv.reader(io.StringIO(data.decode())):
        if len(row) >= 2 and row[1].startswith("sha256="):
            digest = row[1][len("sha256="):]
            out[row[0]] = base64.urlsafe_b64decode(digest + "=" * (-len(digest) % 4)).hex()
    return out


def strip_marker(line: str) -> str:
    return line.split("#", 1)[0].split(";", 1)[0].strip()


def read_sdist(path: Path, version: str) -> dict[str, Any]:
    root = f"vllm-{version}/"
    cmake = "cmake/external_projects/vllm_flash_attn.cmake"
    want = {cmake, "requirements/cuda.txt", "requirements/common.txt", "requirements/build.txt"}
    text: dict[str, str] = {}
    try:
        with tarfile.open(path, "r:gz") as tf:
            for m in tf:
                if m.isfile() and m.name.startswith(root) and m.name[len(root):] in want:
                    text[m.name[len(root):]] = tf.extractfile(m).read().decode()  # type: ignore[union-attr]
    except (tarfile.TarError, OSError, UnicodeDecodeError) as e:
        raise ForgeError(f"cannot read the sdist {path.name}: {e}", "delete it from the cache and pin again") from None
    tags = set(re.findall(r"GIT_TAG\s+([0-9a-f]{40})\b", text.get(cmake, "")))
    if len(tags) != 1:
        raise ForgeError(f"{path.name}: expected one 40-hex flash-attention GIT_TAG in {cmake}, found {sorted(tags)}",
                         "this release builds flash-attention another way: pin it by hand")
    reqs: dict[str, str] = {}
    torch: dict[str, str] = {}
    for f in ("requirements/cuda.txt", "requirements/common.txt", "requirements/build.txt"):
        for line in text.get(f, "").splitlines():
            spec = strip_marker(line)
            if not spec or spec.startswith("-"):
                continue
            try:
                name = canonicalize_name(Requirement(spec).name)
            except InvalidRequirement:
                continue
            if name == "torch" and "==" in spec:
                torch.setdefault(spec, f)
            if name in FA4_REQS and f != "requirements/build.txt":
                reqs.setdefault(spec, f)
    flags = [f"torch pins differ: {torch}"] if len(torch) > 1 else []
    return {"flash_attention_commit": tags.pop(), "torch": next(iter(torch), "").removeprefix("torch=="),
            "fa4_requires": list(reqs), "flags": flags}


def read_wheel(members: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    with zipfile.ZipFile(members) as zf:
        files = {n: zf.read(n) for n in zf.namelist()}
    cute = {n[len(WHEEL_CUTE) + 1:]: d for n, d in files.items() if n.startswith(WHEEL_CUTE + "/")}
    py = {p: d for p, d in cute.items() if p.endswith(".py")}
    bases = {p: files.get(p, b"") for p in BASES}
    return {
        "cute_tree_sha256": tree_sha256(py) if py else "",
        "cute_file_count": len(py),
        "base_files": {p: sha256(d) if d else None for p, d in bases.items()},
        "carries_pr38835": carries_fix(bases),
    }, py


def upstream_form(py: dict[str, bytes], where: str) -> dict[str, bytes]:
    out = {}
    for p, data in py.items():
        up = data.replace(VLLM_PKG.encode(), UPSTREAM_PKG.encode())
        if up.replace(UPSTREAM_PKG.encode(), VLLM_PKG.encode()) != data:
            raise ForgeError(f"{where}: {p} does not round-trip to upstream form", "pin this release by hand")
        out[p] = up
    return out


def backport_overlay(base_files: dict[str, str | None]) -> str:
    """The backport overlay whose manifest has results for all of these base files ("" if none)."""
    bases = read_manifest()["bases"]
    ids: set[str] | None = None
    for sha in base_files.values():
        if sha is None or sha not in bases:
            return ""
        found = {i for i in bases[sha]["results"] if i.startswith(BACKPORT_PREFIX)}
        ids = found if ids is None else ids & found
    return sorted(ids or [""])[0]


def compare_platform(x86_record: dict[str, str], other: dict[str, str]) -> dict[str, Any]:
    """The .py files of two platforms' wheels: how many are identical, which differ or exist on one only."""
    py = sorted({p for p in (*x86_record, *other) if p.endswith(".py")})
    differ = [p for p in py if x86_record.get(p) != other.get(p)]
    return {"python_files": len(py), "python_differs": differ}


@dataclass
class Resolved:
    entry: dict[str, Any]
    upstream_cute: dict[str, bytes] = field(default_factory=dict)  # the x86_64 wheel's FA4 tree, upstream form
    flags: list[str] = field(default_factory=list)
    base_files: dict[str, str | None] = field(default_factory=dict)
    carries: list[str] = field(default_factory=list)


def resolve(index: Index, version: str, platforms: tuple[str, ...] = PLATFORMS) -> Resolved:
    """The pins.json entry of a release, from the index (sdist and x86_64 wheel required)."""
    picked = pick_wheel(index, version, "x86_64")
    sdist = f"vllm-{version}.tar.gz"
    if picked is None or sdist not in index.files(PROJECT):
        raise ForgeError(f"vLLM {version} has no x86_64 cp38-abi3 manylinux wheel and sdist on {index.url}",
                         "check the version (`pip index versions vllm`) or --index-url")
    wheel, choice = picked
    wsha, ssha = entry_sha(index, wheel), entry_sha(index, sdist)
    log(f"{version}: {wheel} ({choice})")
    entry: dict[str, Any] = {"wheel": wheel, "wheel_sha256": wsha, "wheel_choice": choice,
                             "sdist": sdist, "sdist_sha256": ssha}
    sd = read_sdist(cached_download(lambda: index, PROJECT, sdist, ssha), version)
    flags = sd.pop("flags")
    entry |= sd
    members = wheel_members(index, wheel, wsha)
    info, py = read_wheel(members)
    entry["cute_tree_sha256"], entry["cute_file_count"] = info["cute_tree_sha256"], info["cute_file_count"]
    if not py:
        flags.append(f"wheel has no {WHEEL_CUTE}/*.py")
    with zipfile.ZipFile(members) as zf:
        x86_record = parse_record(next(zf.read(n) for n in zf.namelist() if n.endswith("RECORD")))
    plats: dict[str, Any] = {}
    for plat in platforms:
        if plat == "x86_64":
            continue
        other = pick_wheel(index, version, plat)
        if other is None:
            flags.append(f"no {plat} wheel")
            continue
        osha = entry_sha(index, other[0])
        log(f"{version}: {other[0]} ({other[1]})")
        plats[plat] = {"wheel": other[0], "wheel_sha256": osha, "wheel_choice": other[1],
                       **compare_platform(x86_record, wheel_record(index, other[0], osha))}
        if plats[plat]["python_differs"]:
            flags.append(f"{plat}: {len(plats[plat]['python_differs'])} .py file(s) differ from x86_64's")
    if info["carries_pr38835"]:
        entry["plan"] = "tune"
    else:
        entry["plan"] = "backport"
        entry["overlay"] = backport_overlay(info["base_files"])
        if not entry["overlay"]:
            flags.append("lacks PR #38835 and no backport overlay applies to its base files")
    if plats:
        entry["platforms"] = plats
    return Resolved(entry, upstream_form(py, wheel) if py else {}, flags, info["base_files"],
                    info["carries_pr38835"])


# --- `vllm-forge pin`: into the user data directory -------------------------------------------

@dataclass
class PinResult:
    version: str
    path: Path
    entry: dict[str, Any]
    series: str = ""          # the FA series this release uses ("" for backport)
    ported_from: str = ""     # the release whose series was ported ("" when none was needed)
    flags: list[str] = field(default_factory=list)


def _nearest_with_series(pins: Pins, version: str) -> str:
    """The release whose FA series is ported: the newest pinned release before `version` with one
    (series are ported forward), else the oldest after it."""
    from .series import series_for

    have = sorted((v for v, p in pins.vllm.items() if p.plan == "tune" and v != version
                   and series_for(p.cute_tree_sha256) is not None), key=version_key)
    if not have:
        raise ForgeError("no pinned release has a flash-attention series to port", "reinstall vllm-forge")
    older = [v for v in have if version_key(v) < version_key(version)]
    return older[-1] if older else have[0]


def pin_release(version: str, data: Path, index_url: str | None = None,
                conflicts_dir: Path | None = None) -> PinResult:
    """Resolve `version` and write its entry (and a ported FA series where its pin has none) under `data`."""
    from . import refresh_fa
    from .fa4 import fa_target, write_tree
    from .patching import apply_series, read_series
    from .pins import VllmPin
    from .series import dir_series_hash, series_for

    try:
        Version(version)
    except InvalidVersion:
        raise ForgeError(f"{version!r} is not a version", "give a vLLM release, e.g. 0.34.0") from None
    if not re.fullmatch(r"\d+(\.\d+)+", version):
        raise ForgeError(f"{version!r} is not a vLLM release version", "give one like 0.34.0")
    if data.exists() and not data.is_dir():
        raise ForgeError(f"--data-dir {data} is not a directory", "give a directory (it is made if missing)")
    index = Index(index_url)
    res = resolve(index, version)
    entry = res.entry
    if entry["plan"] == "backport" and not entry["overlay"]:
        raise ForgeError(f"vLLM {version} lacks PR #38835 and no backport overlay applies to its base files",
                         "port one with `vllm-forge refresh --from <nearest release> --to ...` (needs a pin)")
    pins = load_pins()
    result = PinResult(version, data / USER_PINS, entry, flags=res.flags)
    port: dict[str, str] = {}
    if entry["plan"] == "tune":
        if not entry["cute_tree_sha256"]:
            raise ForgeError(f"vLLM {version}'s wheel carries no FA4 tree", "this release cannot be tuned")
        found = series_for(entry["cute_tree_sha256"])
        if found is not None:
            result.series = found.hash
        else:
            src = _nearest_with_series(pins, version)
            src_t = fa_target(pins, pins.for_version(src))
            old_series = series_for(src_t.cute_tree_sha256)
            assert old_series is not None
            log(f"vllm-forge: porting series {old_series.dir.name} of vLLM {src} (flash-attention {src_t.short}) "
                f"to flash-attention {entry['flash_attention_commit'][:7]} (vLLM {version})")
            with tempfile.TemporaryDirectory(prefix="vllm-forge-pin-") as tmp:
                work = Path(tmp)
                old = refresh_fa.pin_tree(src_t, work / "old", index_url)
                patches = read_series(old_series.dir)
                ported, conflicts, marked = refresh_fa.port_series(old, res.upstream_cute, patches, work / "port")
                if conflicts:
                    for rel, merged in marked.items() if conflicts_dir is not None else ():
                        (conflicts_dir / rel).parent.mkdir(parents=True, exist_ok=True)  # type: ignore[operator]
                        (conflicts_dir / rel).write_bytes(merged)  # type: ignore[operator]
                    raise ForgeError(f"refresh conflict porting series {old_series.dir.name} to flash-attention "
                                     f"{entry['flash_attention_commit'][:7]}: " + "; ".join(map(str, conflicts)),
                                     "resolve those hunks by hand (kernel work; "
                                     + (f"merged files with markers in {conflicts_dir}" if conflicts_dir else
                                        "--conflicts DIR keeps the merged files") + "), nothing was written")
                port = {**ported, "series": "".join(f"{p.name}\n" for p in patches)}
                check = work / "check"
                for name, text in port.items():
                    (check / name).parent.mkdir(parents=True, exist_ok=True)
                    (check / name).write_text(text)
                write_tree(res.upstream_cute, work / "trial" / CUTE)
                apply_series(check, work / "trial")
                patched = tree_sha256(cmake_install_fa4(work / "trial", work,
                                                                   entry["flash_attention_commit"]))
                result.series = dir_series_hash(check)
            result.ported_from = src
            port_meta = {"commit": entry["flash_attention_commit"], "dir": entry["flash_attention_commit"][:7],
                         "validation": None, "patched": {"series": result.series, "tree_sha256": patched},
                         "ported_from": {"dir": old_series.dir.name, "commit": src_t.commit,
                                         "tree_sha256": src_t.cute_tree_sha256,
                                         "series": dir_series_hash(old_series.dir),
                                         "how": f"vllm-forge pin {version}: git merge-file per patch onto the "
                                                "new pin, clean"}}
    # the entry must load as the shipped ones do
    try:
        VllmPin(version=version, **{**entry, "fa4_requires": tuple(entry["fa4_requires"])})
    except TypeError as e:
        raise ForgeError(f"internal: the pinned entry does not load ({e})", "report this") from None
    _write_user(data, version, entry, port, port_meta if port else None)
    return result


def _write_user(data: Path, version: str, entry: dict[str, Any], port: dict[str, str],
                port_meta: dict[str, Any] | None) -> None:
    """The series directory (if any), its manifest entry, then pins.json; each whole or not at all."""
    from .output import write_text_atomic

    pins_path = data / USER_PINS
    try:
        data.mkdir(parents=True, exist_ok=True)
        raw: dict[str, Any] = json.loads(pins_path.read_text()) if pins_path.is_file() else {"schema": 1, "vllm": {}}
        raw["vllm"][version] = entry
    except (ValueError, KeyError, TypeError) as e:
        raise ForgeError(f"cannot read the user pins {pins_path}: {e}", "fix or remove that file") from None
    made: Path | None = None
    try:
        if port_meta is not None:
            root = data / "patches" / "flash-attention"
            manifest_path = root / "manifest.json"
            manifest: dict[str, Any] = (json.loads(manifest_path.read_text()) if manifest_path.is_file()
                                        else {"schema": 1, "series": {}})
            final = root / port_meta["dir"]
            if final.exists():
                raise ForgeError(f"{final} exists but no pinned release uses it", "remove it, then pin again")
            root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=root, prefix=".series-"))
            made = tmp
            for name, text in port.items():
                (tmp / name).write_text(text)
            os.replace(tmp, final)
            made = final
            manifest["series"][entry["cute_tree_sha256"]] = port_meta
            write_text_atomic(manifest_path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        write_text_atomic(pins_path, json.dumps(raw, indent=2) + "\n")
    except BaseException:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise


# --- scripts/pin_releases.py: the shipped releases ----------------------------------------------

def table(releases: dict[str, dict[str, Any]]) -> str:
    head = ("version", "wheel tag", "aarch64 tag", "FA pin", "tree hash", "files", "torch", "plan", "py differ")
    rows = [head]
    for v, r in releases.items():
        _, _, build, tags = parse_wheel_filename(r["wheel"])
        tag = next(iter(tags)).platform.removesuffix("_x86_64") + (f" build {build[0]}" if build else "")
        arm = r.get("platforms", {}).get("aarch64")
        arm_tag = next(iter(parse_wheel_filename(arm["wheel"])[3])).platform.removesuffix("_aarch64") if arm else "-"
        rows.append((v, tag, arm_tag, r["flash_attention_commit"][:8], (r["cute_tree_sha256"] or "-")[:12],
                     str(r["cute_file_count"]), r["torch"], r["plan"],
                     str(len(arm["python_differs"])) + f"/{arm['python_files']}" if arm else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join(" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def pin_shipped(versions: list[str], pins_path: Path, index_url: str | None = None, write: bool = False) -> str:
    """Re-resolve shipped releases; with write, update their platform entries in pins_path (the rest is kept:
    plans and overlays are the project's decisions). Returns the table and any differences."""
    index = Index(index_url)
    raw = json.loads(pins_path.read_text())
    releases, notes = {}, []
    for v in sorted(versions, key=version_key):
        res = resolve(index, v)
        releases[v] = res.entry
        shipped = raw["vllm"].get(v, {})
        for key in ("wheel", "wheel_sha256", "sdist_sha256", "flash_attention_commit", "cute_tree_sha256"):
            if shipped and shipped.get(key) != res.entry.get(key):
                notes.append(f"  {v}: {key} differs from pins.json ({shipped.get(key)} vs {res.entry.get(key)})")
        notes += [f"  {v}: {f}" for f in res.flags]
        if write and shipped and "platforms" in res.entry:
            shipped["platforms"] = res.entry["platforms"]
    if write:
        pins_path.write_text(json.dumps(raw, indent=2) + "\n")
    return table(releases) + ("\n" + "\n".join(notes) if notes else "")

