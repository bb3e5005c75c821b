"""Stage 5, verify: the static checks of a forged wheel (build runs them last, on its temp file)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from installer.records import parse_record_file
from installer.sources import WheelFile
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

from .assemble import dist_info_dir, metadata_version, open_wheel, record_entry
from .errors import ForgeError
from .fa4 import WHEEL_CUTE, fa_target, tree_sha256, zip_tree
from .overlay import load_stack
from .patching import read_series
from .pins import GEMMA4_LAYER, Pins, load_pins, version_label
from .runtime import MODULE as RUNTIME_MODULE
from .runtime import has_entry_point, runtime_source, runtime_stamp
from .series import series_for, series_hash

STAMP = "vllm_forge.json"


@dataclass
class Report:
    wheel: str
    version: str
    checks: list[str] = field(default_factory=list)

    def ok(self, what: str) -> None:
        self.checks.append(what)


def _fail(path: Path, what: str) -> ForgeError:
    return ForgeError(f"verify {path.name}: {what}", "do not ship this wheel; rebuild it with vllm-forge build")


def verify_wheel(path: Path, pins: Pins | None = None, deep: bool = True,
                 fa_patch_dir: Path | None = None, name: str | None = None) -> Report:
    """Check RECORD, version/metadata, the FA4 tree hash and the overlay results.

    deep=False (what build uses on its own output) hashes only the members build wrote;
    the raw-copied ones came from a base wheel whose sha256 was just verified.
    """
    pins = pins or load_pins()
    filename = name or path.name
    try:
        name, version, _, _ = parse_wheel_filename(filename)
    except Exception as e:  # noqa: BLE001 - packaging raises several types
        raise _fail(path, f"not a wheel file name ({e})") from None
    with open_wheel(path, "wheel", "build it again") as zf:
        di = dist_info_dir(zf, path.name)
        report = Report(filename, str(version))
        if metadata_version(zf, di) != str(version) or di != f"{str(name).replace('-', '_')}-{version}.dist-info":
            raise _fail(path, f"file name, dist-info {di} and METADATA disagree on the version")
        try:
            stamp = json.loads(zf.read(f"{di}/{STAMP}"))
        except KeyError:
            raise _fail(path, f"no {di}/{STAMP}: not a vllm-forge wheel") from None
        vpin = pins.for_version(stamp["vllm"]["version"])
        plan = stamp.get("plan", "backport")
        if plan != vpin.plan:
            raise _fail(path, f"built with plan {plan}, pins.json says {vpin.plan} for vLLM {vpin.version}")
        fa = pins.fa
        target = fa_target(pins, vpin)
        mode = stamp.get("fa4_mode", "bundled")
        s_fa = stamp["flash_attention"]
        series = series_hash([p["sha256"] for p in s_fa["patches"]]) if s_fa["patches"] else ""
        rt = stamp.get("runtime")
        expect = (f"{vpin.version}+"
                  f"{version_label(target.short, mode, GEMMA4_LAYER in stamp['overlay']['layers'], series, bool(rt))}")
        if str(version) != expect or s_fa["commit"] != target.commit:
            raise _fail(path, f"version {version} / FA commit {s_fa['commit'][:12]} "
                              f"do not match the pins ({expect})")
        if stamp["vllm"]["wheel_sha256"] != vpin.wheel_sha256:
            raise _fail(path, "built from a base wheel other than the pinned one")
        report.ok(f"version {version} matches pins (vLLM {vpin.version}, {plan}, flash-attention {target.short})")

        # RECORD
        record_name = f"{di}/RECORD"
        rows = {p: (h, s) for p, h, s in parse_record_file(zf.read(record_name).decode().splitlines())}
        members = [n for n in zf.namelist() if not n.endswith("/")]
        if len(set(members)) != len(members):
            raise _fail(path, "duplicate archive members")
        missing = sorted(set(members) - set(rows))
        extra = sorted(set(rows) - set(members))
        if missing or extra:
            raise _fail(path, f"RECORD does not list {missing[:3]} / lists absent {extra[:3]}")
        stack = load_stack(stamp["overlay"]["layers"])
        overlaid = set(stack.paths) | set(stamp["overlay"]["adds"]) | ({RUNTIME_MODULE} if rt else set())
        written = [n for n in members if n.startswith((di + "/", WHEEL_CUTE + "/")) or n in overlaid]
        for n in written:
            if n == record_name:
                continue
            if tuple(record_entry(n, zf.read(n)).to_row()) != (n, *rows[n]):
                raise _fail(path, f"RECORD hash/size mismatch for {n}")
        report.ok(f"RECORD: {len(members)} members listed, the {len(written)} written by vllm-forge hash-checked")

        # FA4 tree
        cute = zip_tree(zf, WHEEL_CUTE)
        if any(not n.endswith(".py") for n in cute):
            raise _fail(path, f"non-.py files under {WHEEL_CUTE}")
        if mode == "system" and cute:
            raise _fail(path, f"a --fa4 system wheel bundles {WHEEL_CUTE}")
        got_tree = tree_sha256(cute)
        if s_fa["pin_tree_sha256"] != target.cute_tree_sha256:
            raise _fail(path, "stamp's pinned FA4 tree hash differs from pins.json")
        default_series = series_for(target.cute_tree_sha256)
        patch_dir = fa_patch_dir if fa_patch_dir is not None else default_series.dir if default_series else None
        if mode == "system":
            report.ok(f"FA4: none bundled (system FA4, {fa.fa4_wheel.name} required)")
        elif not s_fa["patches"]:
            if got_tree != target.cute_tree_sha256:
                raise _fail(path, f"FA4 tree hash {got_tree} != pinned {target.cute_tree_sha256}")
            report.ok(f"FA4 tree: {len(cute)} files, hash = pin {target.cute_tree_sha256[:12]}")
        else:
            if got_tree != s_fa["tree_sha256"]:
                raise _fail(path, f"FA4 tree hash {got_tree} != recorded patched hash {s_fa['tree_sha256']}")
            if patch_dir is not None and patch_dir.is_dir():
                ours = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in read_series(patch_dir)}
                theirs = {p["name"]: p["sha256"] for p in s_fa["patches"]}
                if ours != theirs:
                    raise _fail(path, f"FA4 patches {sorted(theirs)} differ from the series in {patch_dir}")
            report.ok(f"FA4 tree: {len(cute)} files, pin {target.short} + {len(s_fa['patches'])} patches, "
                      f"hash {got_tree[:12]}")

        # overlay
        for p in stack.paths:
            got = hashlib.sha256(zf.read(p)).hexdigest()
            if got not in stack.final_shas(p):
                raise _fail(path, f"{p} (sha256 {got[:12]}) is not a result of overlay {' + '.join(stack.ids)}")
        for p, data in stack.adds().items():
            if zf.read(p) != data:
                raise _fail(path, f"{p} differs from overlay file of vllm-forge")
        report.ok(f"overlay {' + '.join(stack.ids)}: {len(stack.paths)} files match their result sha256"
                  + (f", {len(stack.adds())} added" if stack.adds() else "") if stack.ids
                  else "overlay: none (tune: the release carries PR #38835)")

        # runtime layer
        if rt:
            if rt != runtime_stamp(runtime_source()):
                raise _fail(path, f"runtime layer {rt['sha256'][:12]} is not this vllm-forge's {RUNTIME_MODULE}")
            if RUNTIME_MODULE not in members or hashlib.sha256(zf.read(RUNTIME_MODULE)).hexdigest() != rt["sha256"]:
                raise _fail(path, f"{RUNTIME_MODULE} is missing or differs from the stamp")
            eps = f"{di}/entry_points.txt"
            if eps not in members or not has_entry_point(zf.read(eps).decode()):
                raise _fail(path, f"{eps} lacks the runtime plugin entry point {rt['entry_point']}")
            report.ok(f"runtime layer {RUNTIME_MODULE} ({rt['sha256'][:12]}) + entry point {rt['entry_point']}")
        elif RUNTIME_MODULE in members:
            raise _fail(path, f"{RUNTIME_MODULE} present but not stamped")

        # metadata
        meta = zf.read(f"{di}/METADATA").decode()
        reqs = [Requirement(ln.split(":", 1)[1].strip()) for ln in meta.split("\n\n", 1)[0].splitlines()
                if ln.startswith("Requires-Dist:")]
        for need in fa.requires if plan == "backport" else ():
            r = Requirement(need)
            have = [q for q in reqs if canonicalize_name(q.name) == canonicalize_name(r.name)]
            if not have or not all(set(r.specifier) <= set(q.specifier) for q in have):
                raise _fail(path, f"METADATA does not require {need}")
        report.ok(f"METADATA requires the pinned FA4's {len(fa.requires)} dependencies" if plan == "backport"
                  else "METADATA: the release's own Requires-Dist (FA4 runtime pins kept)")
    if deep:
        try:
            with WheelFile.open(path) as source:
                source.validate_record(validate_contents=True)
        except Exception as e:  # noqa: BLE001 - installer raises its own types
            raise _fail(path, f"installer rejects the wheel: {e}") from None
        report.ok("installer validates every RECORD entry")
    return report


