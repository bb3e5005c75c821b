"""Stage 5, verify: a forged wheel is what this vllm-forge builds from the pinned inputs.

Nothing the wheel says about itself is trusted: not its RECORD, not the hashes in its stamp
(dist-info/vllm_forge.json), not its file name. The stamp is read for the build *options* only
(release, --fa4 mode, --gemma4-fa4, runtime layer, which patch series, SOURCE_DATE_EPOCH); the
expected wheel is derived from those options and the tool's pinned data:

- rebuild (the default where the pinned base wheel is at hand: `--base-wheel`, or the download
  cache build uses, sha256-checked against pins.json): forge the wheel again into a temp
  directory and compare member by member: the same members, each with the same bytes and file
  mode; the first member that differs is named. The build is reproducible, so an untouched wheel
  is also bit-for-bit identical (said when it is); zip timestamps and compression are not content
  and are not compared.
- pinned checks (always): version, tags (the pinned base wheel file name's: the name is bound to
  the content by its sha256 in pins.json; WHEEL must declare the same family), FA4 tree (the
  series manifest's patched tree hash, or the series applied to the pinned tree), overlay results
  (overlay manifests), overlay adds and runtime module (the tool's own files), METADATA
  requirements.
- self-consistency (always): RECORD lists every member and its rows match the members (deep:
  every member, by installer). Without the base, the members copied from it are checked only
  against the wheel's own RECORD, and the report says "self-consistency only, base wheel not
  available".
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import struct
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from installer.sources import WheelFile
from packaging.requirements import InvalidRequirement, Requirement
from packaging.tags import Tag
from packaging.utils import canonicalize_name, parse_wheel_filename

from .assemble import (
    dist_info_dir,
    member_text,
    metadata_version,
    open_wheel,
    read_record,
    record_entry,
    tag_family,
    wheel_tags,
)
from .errors import ForgeError
from .fa4 import WHEEL_CUTE, FaTarget, fa_target, no_series, tree_sha256, zip_tree
from .fetch import cache_dir, sha256_file
from .overlay import load_stack
from .patching import read_series
from .pins import (
    FA4_MODES,
    GEMMA4_LAYER,
    Pins,
    VllmPin,
    layers_for,
    load_pins,
    version_label,
)
from .runtime import MODULE as RUNTIME_MODULE
from .runtime import has_entry_point, runtime_source
from .series import series_for, series_hash

STAMP = "vllm_forge.json"
SELF_ONLY = "self-consistency only, base wheel not available"


@dataclass
class Report:
    wheel: str
    version: str
    checks: list[str] = field(default_factory=list)
    level: str = ""  # "rebuild" or SELF_ONLY (deep); "" for build's own check

    def ok(self, what: str) -> None:
        self.checks.append(what)


@dataclass(frozen=True)
class Options:
    """The build options a stamp records: all verify takes from it."""

    vpin: VllmPin
    fa4_mode: str
    gemma4: bool
    runtime: bool
    patches: tuple[tuple[str, str], ...]  # (name, sha256): which series, checked against files here
    epoch: int
    tool: str
    user: dict[str, Any] | None = None  # the user's own vLLM patches (user_patches.py): the stamp's record

    @property
    def user_hash(self) -> str:
        """The series hash of the user's patches, from their text (never the stamp's word)."""
        if not self.user:
            return ""
        return series_hash([hashlib.sha256(p["text"].encode()).hexdigest() for p in self.user["patches"]])


def _fail(path: Path | str, what: str) -> ForgeError:
    return ForgeError(f"verify {Path(path).name}: {what}", "do not ship this wheel; rebuild it with vllm-forge build")


def read_options(zf: zipfile.ZipFile, di: str, pins: Pins, path: str) -> Options:
    try:
        stamp = json.loads(zf.read(f"{di}/{STAMP}"))
    except KeyError:
        raise _fail(path, f"no {di}/{STAMP}: not a vllm-forge wheel") from None
    except ValueError as e:
        raise _fail(path, f"{di}/{STAMP} is not JSON ({e})") from None
    try:
        vpin = pins.for_version(str(stamp["vllm"]["version"]),
                                platform=str(stamp["vllm"].get("platform", "x86_64")))
        mode = stamp.get("fa4_mode", "bundled")
        layers = list(stamp["overlay"]["layers"])
        patches = tuple((str(p["name"]), str(p["sha256"])) for p in stamp["flash_attention"]["patches"])
        epoch = stamp["source_date_epoch"]
        if mode not in FA4_MODES or not isinstance(epoch, int) or isinstance(epoch, bool):
            raise ValueError("fa4_mode or source_date_epoch")
        user = stamp.get("user_patches")
        if user is not None:
            for up in user["patches"]:
                if not isinstance(up["text"], str) or hashlib.sha256(up["text"].encode()).hexdigest() != up["sha256"]:
                    raise ValueError(f"user patch {up['name']!r}: text and sha256 disagree")
            if not isinstance(user["bases"], dict) or not isinstance(user["results"], dict):
                raise ValueError("user_patches bases/results")
        opts = Options(vpin, mode, GEMMA4_LAYER in layers, bool(stamp.get("runtime")), patches, epoch,
                       str(stamp["tool"]), user)
    except ForgeError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise _fail(path, f"{di}/{STAMP} is malformed ({type(e).__name__}: {e})") from None
    plan = stamp.get("plan", "backport")
    if plan != vpin.plan:
        raise _fail(path, f"built with plan {plan}, pins.json says {vpin.plan} for vLLM {vpin.version}")
    want = _layers(opts)
    if layers != want:
        raise _fail(path, f"stamp's overlay layers {layers} are not those of its options ({want})")
    return opts


def _layers(opts: Options) -> list[str]:
    """The overlay stack the options give (as build makes it): pinned data, not the stamp's list."""
    vpin = opts.vpin
    return layers_for(vpin.overlay if vpin.plan == "backport" else "", opts.fa4_mode, opts.gemma4)


def _series_files(d: Path) -> tuple[tuple[str, str], ...]:
    return tuple((p.name, hashlib.sha256(p.read_bytes()).hexdigest()) for p in read_series(d))


def resolve_series(path: str, opts: Options, target: FaTarget, fa_patch_dir: Path | None) -> Path | None:
    """The patch directory the stamp's series is in here: --fa-patches, else the pin's series;
    None for "no patches". Refuses a series that is not here."""
    if fa_patch_dir is not None:
        if not fa_patch_dir.is_dir():
            raise ForgeError(f"flash-attention patch directory {fa_patch_dir} does not exist", "check --fa-patches")
        if _series_files(fa_patch_dir) != opts.patches:
            raise _fail(path, f"FA4 patches {[n for n, _ in opts.patches]} differ from the series in {fa_patch_dir}")
        return fa_patch_dir
    if not opts.patches:
        return None
    default = series_for(target.cute_tree_sha256)
    if default is None or _series_files(default.dir) != opts.patches:
        raise _fail(path, f"FA4 patches {[n for n, _ in opts.patches]} differ from the series vllm-forge has for "
                          f"flash-attention {target.short} (verify --fa-patches DIR: the series it was built with)")
    return default.dir


def find_base(vpin: VllmPin, base_wheel: Path | None) -> Path | None:
    """The pinned base wheel: --base-wheel (must be it), else build's cached copy if intact."""
    if base_wheel is not None:
        if not base_wheel.is_file():
            raise ForgeError(f"base wheel {base_wheel} does not exist", "check --base-wheel")
        if sha256_file(base_wheel) != vpin.wheel_sha256:
            raise ForgeError(f"base wheel {base_wheel} is not the pinned {vpin.wheel} (sha256 differs)",
                             f"pass the vLLM {vpin.version} wheel pinned in pins.json")
        return base_wheel
    cached = cache_dir() / "dl" / vpin.wheel
    if cached.is_file() and sha256_file(cached) == vpin.wheel_sha256:
        return cached
    return None


def verify_wheel(path: Path, pins: Pins | None = None, deep: bool = True,
                 fa_patch_dir: Path | None = None, name: str | None = None,
                 base_wheel: Path | None = None, use_base: bool = True,
                 fa_tree: str | None = None, platform: str | None = None,
                 user_patches: Path | None = None) -> Report:
    """Check a forged wheel against what the pinned inputs give (see the module docstring).

    deep=False (build on its own output, `verify --quick`): no rebuild, and RECORD hashes only
    the members vllm-forge wrote. deep=True: rebuild and compare where the base wheel is found
    (base_wheel, else the cache; use_base=False skips it), else self-consistency only.
    fa_tree: the patched FA4 tree hash build itself computed (build's own check).
    """
    pins = pins or load_pins()
    filename = name or path.name
    try:
        wname, version, _, tags = parse_wheel_filename(filename)
    except Exception as e:  # noqa: BLE001 - packaging raises several types
        raise _fail(filename, f"not a wheel file name ({e})") from None
    with open_wheel(path, "wheel", "build it again") as zf:
        di = dist_info_dir(zf, path.name)
        report = Report(filename, str(version))
        if metadata_version(zf, di) != str(version) or di != f"{str(wname).replace('-', '_')}-{version}.dist-info":
            raise _fail(filename, f"file name, dist-info {di} and METADATA disagree on the version")
        opts = read_options(zf, di, pins, filename)
    vpin = opts.vpin
    if platform is not None and platform != vpin.platform:
        raise ForgeError(f"verify {filename}: built for --platform {vpin.platform}, not {platform}",
                         f"verify it with --platform {vpin.platform} (or without --platform)")
    target = fa_target(pins, vpin)
    patch_dir = resolve_series(filename, opts, target, fa_patch_dir)
    _name_checks(filename, opts, target, tags, report)

    rebuilt = False
    if deep and use_base:
        base = find_base(vpin, base_wheel)
        if base is not None:
            _rebuild_and_compare(path, filename, opts, base, patch_dir, report, user_patches)
            rebuilt = True
    if deep:
        report.level = "rebuild" if rebuilt else SELF_ONLY if use_base else "self-consistency only, --no-base"

    with open_wheel(path, "wheel", "build it again") as zf:
        _pinned_checks(zf, di, path, filename, pins, opts, target, patch_dir, tags, fa_tree, rebuilt, report)
    if deep and not rebuilt:  # (a rebuild's RECORD is the tool's own: equal content covers it)
        try:
            with WheelFile.open(path) as source:
                source.validate_record(validate_contents=True)
        except Exception as e:  # noqa: BLE001 - installer raises its own types
            raise _fail(filename, f"installer rejects the wheel: {e}") from None
        report.ok(f"installer validates every RECORD entry ({report.level}: the members copied from the "
                  "base are checked against the wheel's own RECORD alone)")
    return report


def _name_checks(filename: str, opts: Options, target: FaTarget, tags: frozenset[Tag], report: Report) -> None:
    """The version label the options give, and the tags of the pinned base wheel (never the name a
    base file had): before anything else, so that a misnamed wheel is named as such."""
    vpin = opts.vpin
    series = series_hash([s for _, s in opts.patches]) if opts.patches else ""
    label = version_label(target.short, opts.fa4_mode, opts.gemma4, series, opts.runtime, opts.user_hash)
    expect = f"{vpin.version}+{label}"
    if report.version != expect:
        raise _fail(filename, f"version {report.version} does not match the pins and the stamp's options ({expect})")
    report.ok(f"version {report.version} matches pins (vLLM {vpin.version}, {vpin.plan}, "
              f"flash-attention {target.short})")
    base_tags = parse_wheel_filename(vpin.wheel)[3]
    if tags != base_tags:
        raise _fail(filename, f"file name tags {', '.join(sorted(map(str, tags)))} are not the base wheel's "
                              f"({', '.join(sorted(map(str, base_tags)))}, {vpin.wheel})")


def _pinned_checks(zf: zipfile.ZipFile, di: str, path: Path, filename: str, pins: Pins, opts: Options,
                   target: FaTarget, patch_dir: Path | None, tags: frozenset[Tag], fa_tree: str | None,
                   rebuilt: bool, report: Report) -> None:
    vpin, mode, rt = opts.vpin, opts.fa4_mode, opts.runtime
    base_tags = parse_wheel_filename(vpin.wheel)[3]
    declared = wheel_tags(zf, di)
    if tag_family(declared) != tag_family(base_tags):  # (a rebuild compares WHEEL exactly)
        raise _fail(filename, f"{di}/WHEEL tags {', '.join(sorted(map(str, declared)))} are not the base wheel's "
                              f"({', '.join(sorted(map(str, base_tags)))})")
    report.ok(f"tags {', '.join(sorted(map(str, tags)))}: the pinned base wheel's")

    # RECORD: self-consistency
    record_name = f"{di}/RECORD"
    rows = read_record(zf, di)
    members = [n for n in zf.namelist() if not n.endswith("/")]
    if len(set(members)) != len(members):
        raise _fail(filename, "duplicate archive members")
    missing = sorted(set(members) - set(rows))
    extra = sorted(set(rows) - set(members))
    if missing or extra:
        raise _fail(filename, f"RECORD does not list {missing[:3]} / lists absent {extra[:3]}")
    stack = load_stack(_layers(opts))
    adds = stack.adds()
    user_results = {str(p): str(h) for p, h in (opts.user or {}).get("results", {}).items()}
    overlaid = set(stack.paths) | set(adds) | ({RUNTIME_MODULE} if rt else set()) | set(user_results)
    written = [n for n in members if n.startswith((di + "/", WHEEL_CUTE + "/")) or n in overlaid]
    for n in written:
        if n == record_name:
            continue
        if tuple(record_entry(n, zf.read(n)).to_row()) != (n, *rows[n]):
            raise _fail(filename, f"RECORD hash/size mismatch for {n}")
    report.ok(f"RECORD: {len(members)} members listed, the {len(written)} written by vllm-forge hash-checked")

    # FA4 tree: against pinned data, never the stamp's hash
    cute = zip_tree(zf, WHEEL_CUTE)
    if any(not n.endswith(".py") for n in cute):
        raise _fail(filename, f"non-.py files under {WHEEL_CUTE}")
    got_tree = tree_sha256(cute)
    if mode == "system":
        if cute:
            raise _fail(filename, f"a --fa4 system wheel bundles {WHEEL_CUTE}")
        report.ok(f"FA4: none bundled (system FA4, {pins.fa.fa4_wheel.name} required)")
    else:
        want, source = _expected_tree(pins, opts, target, patch_dir, fa_tree, rebuilt)
        if want is not None and got_tree != want:
            which = _first_fa4_difference(pins, target, patch_dir, cute)
            raise _fail(filename, f"FA4 tree {WHEEL_CUTE}/ (hash {got_tree[:12]}) is not {source} ({want[:12]}): "
                                  + (which or "a file under it was changed, added or removed"))
        report.ok(f"FA4 tree: {len(cute)} files, pin {target.short}"
                  + (f" + {len(opts.patches)} patches" if opts.patches else "") + f", hash {got_tree[:12]} = {source}")

    # overlay: the results pinned in the overlay manifests, the adds = the tool's files
    for p, want_sha in user_results.items():
        got = hashlib.sha256(zf.read(p)).hexdigest() if p in zf.NameToInfo else "missing"
        if got != want_sha:
            raise _fail(filename, f"{p} (sha256 {got[:12]}) is not the result of your patches the stamp records")
    if user_results:
        report.ok(f"your patches (series {opts.user_hash}): {len(user_results)} file(s) as the stamp records"
                  + ("" if rebuilt else "; a rebuild checks them"))
    for p in (q for q in stack.paths if q not in user_results):
        got = hashlib.sha256(zf.read(p)).hexdigest() if p in zf.NameToInfo else "missing"
        if got not in stack.final_shas(p):
            raise _fail(filename, f"{p} (sha256 {got[:12]}) is not a result of overlay {' + '.join(stack.ids)}")
    for p, data in adds.items():
        if p not in zf.NameToInfo or zf.read(p) != data:
            raise _fail(filename, f"{p} differs from overlay file of vllm-forge")
    report.ok(f"overlay {' + '.join(stack.ids)}: {len(stack.paths)} files match their result sha256"
              + (f", {len(adds)} added" if adds else "") if stack.ids
              else "overlay: none (tune: the release carries PR #38835)")

    # runtime layer: the tool's own module
    if rt:
        if RUNTIME_MODULE not in zf.NameToInfo or zf.read(RUNTIME_MODULE) != runtime_source():
            raise _fail(filename, f"{RUNTIME_MODULE} is missing or is not this vllm-forge's runtime layer")
        eps = f"{di}/entry_points.txt"
        if eps not in zf.NameToInfo or not has_entry_point(member_text(zf, eps)):
            raise _fail(filename, f"{eps} lacks the runtime plugin entry point")
        report.ok(f"runtime layer {RUNTIME_MODULE} = this vllm-forge's, entry point present")
    elif RUNTIME_MODULE in zf.NameToInfo:
        raise _fail(filename, f"{RUNTIME_MODULE} present but the stamp's options leave it out")

    # metadata
    meta = member_text(zf, f"{di}/METADATA")
    try:
        reqs = [Requirement(ln.split(":", 1)[1].strip()) for ln in meta.split("\n\n", 1)[0].splitlines()
                if ln.startswith("Requires-Dist:")]
    except InvalidRequirement as e:
        raise _fail(filename, f"METADATA has a malformed Requires-Dist ({e})") from None
    for need in pins.fa.requires if vpin.plan == "backport" else ():
        r = Requirement(need)
        have = [q for q in reqs if canonicalize_name(q.name) == canonicalize_name(r.name)]
        if not have or not all(set(r.specifier) <= set(q.specifier) for q in have):
            raise _fail(filename, f"METADATA does not require {need}")
    report.ok(f"METADATA requires the pinned FA4's {len(pins.fa.requires)} dependencies" if vpin.plan == "backport"
              else "METADATA: the release's own Requires-Dist (FA4 runtime pins kept)")


def _expected_tree(pins: Pins, opts: Options, target: FaTarget, patch_dir: Path | None,
                   fa_tree: str | None, rebuilt: bool) -> tuple[str | None, str]:
    """The FA4 tree hash the pinned inputs give, and where it comes from."""
    if not opts.patches:
        return target.cute_tree_sha256, "the pinned tree (pins.json)"
    default = series_for(target.cute_tree_sha256)
    if default is not None and patch_dir == default.dir:
        recorded = default.patched_tree_sha256()
        if recorded:
            return recorded, f"the patched tree recorded for series {default.dir.name} (manifest.json)"
    if fa_tree is not None:
        return fa_tree, "the series applied by this build"
    if rebuilt:
        return None, "the rebuild's"
    return tree_sha256(_derived_tree(pins, target, patch_dir)), f"the pinned tree with {patch_dir} applied"


def _derived_tree(pins: Pins, target: FaTarget, patch_dir: Path | None) -> dict[str, bytes]:
    """The FA4 files the pinned inputs give (the pin's tree from its mirrors, tree-hash checked,
    with the series applied), as the wheel carries them."""
    from functools import cache

    from .fa4 import get_fa4_sources
    from .fetch import Index

    with tempfile.TemporaryDirectory(prefix="vllm-forge-verify-") as work, \
            contextlib.redirect_stderr(io.StringIO()):
        return get_fa4_sources(target, Path(work), cache(lambda: Index()), pins.index_project,
                               patch_dir=no_series(Path(work)) if patch_dir is None else patch_dir).files


def _first_fa4_difference(pins: Pins, target: FaTarget, patch_dir: Path | None, cute: dict[str, bytes]) -> str:
    """Which FA4 member differs from the derived tree ("" when the tree cannot be derived here)."""
    try:
        want = _derived_tree(pins, target, patch_dir)
    except (ForgeError, OSError):
        return ""
    for rel in sorted(set(want) | set(cute)):
        member = f"{WHEEL_CUTE}/{rel}"
        if rel not in cute:
            return f"{member} is missing"
        if rel not in want:
            return f"{member} is not in the pinned tree"
        if cute[rel] != want[rel]:
            return f"{member} differs from the pinned tree with the series applied"
    return ""


def _user_dir(filename: str, opts: Options, given: Path | None, work: Path) -> Path | None:
    """The user's patch series to rebuild with: --patches DIR (must be the stamp's), else the stamp's copy."""
    if not opts.user:
        if given is not None:
            raise _fail(filename, "built without --patches, but verify was given --patches")
        return None
    if given is not None:
        from .user_patches import load_user_series

        mine = load_user_series(given).stamp()
        if [(p["name"], p["sha256"]) for p in mine["patches"]] != [(p["name"], p["sha256"])
                                                                   for p in opts.user["patches"]]:
            raise _fail(filename, f"its patches differ from those in {given}")
        return given
    d = work / "user-patches"
    d.mkdir()
    for p in opts.user["patches"]:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", str(p["name"])) or p["name"] in ("series", "bases.json"):
            raise _fail(filename, f"the stamp names a user patch {p['name']!r}")
        (d / p["name"]).write_text(p["text"])
    (d / "series").write_text("".join(f"{p['name']}\n" for p in opts.user["patches"]))
    (d / "bases.json").write_text(json.dumps(opts.user["bases"]))
    return d


def _rebuild_and_compare(path: Path, filename: str, opts: Options, base: Path, patch_dir: Path | None,
                         report: Report, user_patches: Path | None = None) -> None:
    from . import __version__
    from .build import build

    tool = f"vllm-forge {__version__}"
    if opts.tool != tool:  # the stamp names the tool: another version's rebuild cannot match
        raise ForgeError(f"verify {filename}: built by {opts.tool}, this is {tool}",
                         "verify it with the vllm-forge that built it, or rebuild it with this one")
    with tempfile.TemporaryDirectory(prefix="vllm-forge-verify-") as tmp:
        work = Path(tmp)
        if patch_dir is None:  # built without patches: not the pin's default series
            patch_dir = no_series(work)
        log = io.StringIO()
        try:
            with contextlib.redirect_stderr(log):
                result = build(opts.vpin.version, work / "out", base_wheel=base, fa_patch_dir=patch_dir,
                               fa4_mode=opts.fa4_mode, gemma4_fa4=opts.gemma4, allow_unvalidated=True,
                               runtime=opts.runtime, epoch=opts.epoch, platform=opts.vpin.platform,
                               user_patches=_user_dir(filename, opts, user_patches, work))
        except ForgeError as e:
            raise ForgeError(f"verify {filename}: cannot rebuild it from the pinned inputs: {e.what}",
                             e.hint) from None
        compare_wheels(path, filename, result.wheel, report)


def _mode(info: zipfile.ZipInfo) -> int:
    return info.external_attr >> 16


def _raw_data(f: io.BufferedReader, info: zipfile.ZipInfo) -> tuple[int, int]:
    """Offset and length of a member's stored (compressed) data."""
    f.seek(info.header_offset)
    head = f.read(30)
    if len(head) != 30 or head[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local header for {info.filename}")
    n, e = struct.unpack("<HH", head[26:30])
    return info.header_offset + 30 + n + e, info.compress_size


def _same_stream(a: IO[bytes], b: IO[bytes], left: int | None = None) -> bool:
    while True:
        n = 1 << 20 if left is None else min(1 << 20, left)
        x, y = a.read(n), b.read(n)
        if x != y:
            return False
        if not x or (left is not None and (left := left - len(x)) == 0):
            return True


def _same_content(za: zipfile.ZipFile, fa: io.BufferedReader, ia: zipfile.ZipInfo,
                  zb: zipfile.ZipFile, fb: io.BufferedReader, ib: zipfile.ZipInfo) -> bool:
    if ia.file_size != ib.file_size:
        return False
    if ia.compress_type == ib.compress_type and ia.compress_size == ib.compress_size:
        (oa, n), (ob, _) = _raw_data(fa, ia), _raw_data(fb, ib)
        fa.seek(oa)
        fb.seek(ob)
        if _same_stream(fa, fb, n):  # same stored bytes, same method: same content (the common case)
            return True
    with za.open(ia) as a, zb.open(ib) as b:
        return _same_stream(a, b)


def compare_wheels(path: Path, filename: str, rebuilt: Path, report: Report) -> None:
    """The wheel against the rebuild: same name, members, modes and bytes; the first difference named."""
    if filename != rebuilt.name:
        raise _fail(filename, f"file name is not what vllm-forge builds from the pinned inputs ({rebuilt.name})")
    digest = sha256_file(path)
    if digest == sha256_file(rebuilt):
        report.ok(f"bit for bit identical to a rebuild from the pinned inputs (sha256 {digest[:12]})")
        return
    with zipfile.ZipFile(path) as za, zipfile.ZipFile(rebuilt) as zb, open(path, "rb") as fa, \
            open(rebuilt, "rb") as fb:
        theirs = {i.filename: i for i in za.infolist()}
        if len(theirs) != len(za.infolist()):
            raise _fail(filename, "duplicate archive members")
        ours = zb.infolist()
        names = {i.filename for i in ours}
        gone = [i.filename for i in ours if i.filename not in theirs]
        if gone:
            raise _fail(filename, f"{gone[0]} is missing: vllm-forge's build has it"
                                  + (f" (and {len(gone) - 1} more)" if len(gone) > 1 else ""))
        extra = [n for n in theirs if n not in names]
        if extra:
            raise _fail(filename, f"{extra[0]} is not in what vllm-forge builds from the pinned inputs"
                                  + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
        for ib in ours:
            ia = theirs[ib.filename]
            if _mode(ia) != _mode(ib):
                raise _fail(filename, f"{ib.filename} has file mode {oct(_mode(ia))}, vllm-forge's build "
                                      f"{oct(_mode(ib))}")
            try:
                same = _same_content(za, fa, ia, zb, fb, ib)
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:  # bad CRC, bad data
                raise _fail(filename, f"{ib.filename} is unreadable ({e})") from None
            if not same:
                raise _fail(filename, f"{ib.filename} differs from what vllm-forge builds from the pinned inputs")
    report.ok(f"every one of {len(ours)} members identical to a rebuild from the pinned inputs "
              "(the zip layout differs: timestamps or compression, not content)")
