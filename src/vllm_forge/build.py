"""The pipeline: resolve -> fetch/verify -> overlay/patch -> assemble -> verify, with atomic output."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from . import __version__, provenance
from .assemble import assemble, read_base
from .errors import ForgeError
from .fa4 import WHEEL_CUTE, FaTarget, fa_target, get_fa4_sources
from .fa4_wheel import fa4_wheel_version
from .fetch import Index, cache_dir, check_digest, clear_cache_slot, evict, sha256_file
from .output import check_output_dir, publish_together, source_date_epoch, staged_output
from .overlay import Stack, gemma4_fa4_for, load_stack, sha256
from .pins import FA4_MODES, Pins, VllmPin, layers_for, load_pins, version_label
from .runtime import MODULE as RUNTIME_MODULE
from .runtime import add_entry_point, runtime_source, runtime_stamp
from .series import series_for, series_hash
from .user_patches import UserSeries, apply_user_series, load_user_series
from .validation import accepted, check_device_class, user_data_dir
from .verify import STAMP, Report, verify_wheel


@dataclass(frozen=True)
class BuildResult:
    wheel: Path
    manifest: Path


def build(version: str | None = None, out_dir: Path = Path("dist"), base_wheel: Path | None = None,
          fa_src: str | None = None, index_url: str | None = None,
          fa_patch_dir: Path | None = None, fa4_mode: str = "bundled", gemma4_fa4: bool | None = None,
          allow_unvalidated: bool = False, runtime: bool = True, device_class: str = "sm90",
          epoch: int | None = None, platform: str = "x86_64", user_patches: Path | None = None) -> BuildResult:
    """gemma4_fa4: None = the release's default (on where it forces TRITON_ATTN for Gemma-4).
    epoch (verify's rebuild): overrides SOURCE_DATE_EPOCH and the base's timestamp.
    platform: whose release wheel is the base (x86_64, aarch64); the plan is the same.
    user_patches: the user's own vLLM patch series (user_patches.py), applied after the overlays."""
    t0 = time.monotonic()
    source_date_epoch(0, "")  # a malformed SOURCE_DATE_EPOCH is refused before any work
    pins = load_pins()
    vpin = pins.for_version(version or pins.default_vllm, platform=platform)
    if fa4_mode not in FA4_MODES:
        raise ForgeError(f"unknown --fa4 mode {fa4_mode!r}", f"use one of {', '.join(FA4_MODES)}")
    check_device_class(device_class)
    gemma4_fa4 = gemma4_fa4_for(vpin.version, gemma4_fa4)
    if vpin.plan == "tune":
        check_tune(pins, vpin, fa_patch_dir, fa4_mode, allow_unvalidated, device_class)
    stack = load_stack(layers_for(vpin.overlay if vpin.plan == "backport" else "", fa4_mode, gemma4_fa4))
    user = load_user_series(user_patches) if user_patches is not None else None
    check_output_dir(out_dir)  # before a 433 MB download
    index = cache(lambda: Index(index_url))
    project = pins.index_project

    # fetch: the base wheel (its sha256 is checked during the repack, in the same read)
    if base_wheel is not None:
        base = Path(base_wheel)
        if not base.is_file():
            raise ForgeError(f"base wheel {base} does not exist", "check --base-wheel")
        base_origin = f"local {base}"
    else:
        base = cache_dir() / "dl" / vpin.wheel
        base_origin = f"cache {base}"
        clear_cache_slot(base)
        if not base.is_file():
            base = index().download(project, vpin.wheel, vpin.wheel_sha256, base.parent)
            base_origin = f"index {index().url}{project}/"
    print(f"vllm-forge {__version__}: vLLM {vpin.version} {vpin.platform} ({vpin.plan}) + flash-attention "
          f"{pins.fa_commit(vpin)[:7]} (overlay {' + '.join(stack.ids) or 'none'}, FA4 {fa4_mode})", file=sys.stderr)
    try:
        final, manifest_path, report = _forge(
            pins, vpin, stack, fa4_mode, gemma4_fa4, base, base_origin, out_dir, index, fa_src, fa_patch_dir,
            from_cache=base_origin.startswith("cache "), runtime=runtime, epoch=epoch, user=user)
    except _CorruptCache:  # the cache repairs itself: evict, download, verify, forge again
        evict(base)
        base = index().download(project, vpin.wheel, vpin.wheel_sha256, base.parent)
        final, manifest_path, report = _forge(
            pins, vpin, stack, fa4_mode, gemma4_fa4, base, f"index {index().url}{project}/", out_dir, index,
            fa_src, fa_patch_dir, from_cache=False, runtime=runtime, epoch=epoch, user=user)
    print(f"forged {final} in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    for check in report.checks:
        print(f"  ok: {check}", file=sys.stderr)
    return BuildResult(final, manifest_path)


class _CorruptCache(Exception):
    """The cached base wheel failed its sha256 (found during the repack): evict it, forge again."""


def _forge(pins: Pins, vpin: VllmPin, stack: Stack, fa4_mode: str, gemma4_fa4: bool, base: Path, base_origin: str,
           out_dir: Path, index: Callable[[], Index], fa_src: str | None, fa_patch_dir: Path | None,
           from_cache: bool, runtime: bool = True, epoch: int | None = None,
           user: UserSeries | None = None) -> tuple[Path, Path, Report]:
    project = pins.index_project
    with staged_output(out_dir) as temp, tempfile.TemporaryDirectory(prefix="vllm-forge-") as work, \
            ThreadPoolExecutor(2) as pool:
        base_digest = pool.submit(sha256_file, base)  # overlaps FA4, overlay and repack
        target: FaTarget = fa_target(pins, vpin, base)
        try:  # a cached base that fails anywhere here is checked against its sha256
            base_files, base_stamp = read_base(base, vpin.version, stack.paths)
            overlaid, done = stack.apply(base_files)
            user_files: dict[str, bytes] = {}
            if user is not None:
                release, _ = read_base(base, vpin.version, list(user.files))
                user_files = apply_user_series(user, vpin.version, release, overlaid, Path(work))
            adds = stack.adds()
            rt_source = runtime_source() if runtime else None
            fa = get_fa4_sources(target, Path(work), index, project, fa_src, fa_patch_dir)
            epoch, epoch_from = ((epoch, "the wheel being verified") if epoch is not None else
                                 source_date_epoch(base_stamp, "base wheel METADATA timestamp"))
            stamp = {
                "tool": f"vllm-forge {__version__}",
                "vllm": {"version": vpin.version, "wheel": vpin.wheel, "wheel_sha256": vpin.wheel_sha256,
                         **({"platform": vpin.platform} if vpin.platform != "x86_64" else {})},
                "plan": vpin.plan,
                "flash_attention": {
                    "commit": target.commit, "pin_tree_sha256": fa.pin_tree_sha256,
                    "tree_sha256": fa.tree_sha256,
                    "patches": [{"name": p.name, "sha256": p.sha256} for p in fa.patches],
                },
                "fa4_mode": fa4_mode,
                "overlay": {
                    "layers": stack.ids,
                    "files": done,
                    "adds": {p: sha256(d) for p, d in sorted(adds.items())},
                },
                "source_date_epoch": epoch,
                "runtime": runtime_stamp(rt_source) if rt_source is not None else None,
            }
            if user is not None:
                stamp["user_patches"] = {**user.stamp(), "results": {p: sha256(d) for p, d in user_files.items()}}
            tmp_wheel = temp(".whl.part")
            bundled = {} if fa4_mode == "system" else {f"{WHEEL_CUTE}/{p}": d for p, d in fa.files.items()}
            system_req = [f"{pins.fa.fa4_wheel.name}=={fa4_wheel_version(pins.fa, fa.patches)}"]
            # backport: FA4's runtime requirements merged in; tune: the release's own FA4 pins stay
            requires = ([] if vpin.plan == "tune" else
                        list(pins.fa.requires) + (system_req if fa4_mode == "system" else []))
            series = series_hash([p.sha256 for p in fa.patches]) if fa.patches else ""
            forged = assemble(
                base, tmp_wheel, base_name=vpin.wheel,
                label=version_label(target.short, fa4_mode, gemma4_fa4, series, runtime, user.hash if user else ""),
                drop_prefixes=(WHEEL_CUTE + "/",), replace={**overlaid, **user_files},
                add={**adds, **bundled, **({RUNTIME_MODULE: rt_source} if rt_source is not None else {})},
                requires=requires,
                stamp=(STAMP, (json.dumps(stamp, indent=2, sort_keys=True) + "\n").encode()), epoch=epoch,
                dist_info_edits={"entry_points.txt": add_entry_point} if runtime else None)
            final = out_dir / forged.filename
            out_digest = pool.submit(sha256_file, tmp_wheel)
            check_digest(base_digest.result(), vpin.wheel_sha256, f"base wheel {base}",
                         "the file is corrupt, truncated or another build; delete it and download it again")
        except Exception:
            if from_cache and base_digest.result() != vpin.wheel_sha256:
                raise _CorruptCache() from None
            raise
        report = verify_wheel(tmp_wheel, pins, deep=False, fa_patch_dir=fa_patch_dir,
                              name=forged.filename, fa_tree=fa.tree_sha256)
        manifest = {
            **stamp,
            "output": {"wheel": forged.filename, "sha256": out_digest.result(),
                       "size": tmp_wheel.stat().st_size},
            "inputs": {
                "base_wheel": {"file": vpin.wheel, "sha256": vpin.wheel_sha256, "mirror": base_origin},
                "flash_attention": {"commit": target.commit, "tree_sha256": fa.pin_tree_sha256,
                                    "mirror": fa.mirror},
                "pins": {"file": "pins.json", "sha256": sha256_file(pins.path)},
            },
            "source_date_epoch_from": epoch_from,
            "verify": report.checks,
        }
        man_tmp = temp(".json.part")
        man_tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        manifest_path = out_dir / (forged.filename[:-4] + ".manifest.json")
        prov_tmp = temp(".json.part")
        prov_tmp.write_bytes(provenance.render(provenance.statement(
            forged.filename, out_digest.result(), stamp, pins.fa.git_repository)))
        # together or not at all; the manifest and statement first, so that whoever sees the wheel finds them
        publish_together([(man_tmp, manifest_path), (prov_tmp, provenance.statement_path(final)), (tmp_wheel, final)])
    return final, manifest_path, report


def check_tune(pins: Pins, vpin: VllmPin, fa_patch_dir: Path | None, fa4_mode: str,
               allow_unvalidated: bool, device_class: str = "sm90") -> None:
    """A `tune` build: the release's own FA pin + that pin's series, shipped only GPU-validated: by the
    tool's manifest record, or by a passed `vllm-forge validate` record in the user data directory
    for this series on `device_class`."""
    if fa4_mode != "bundled":
        raise ForgeError(f"--fa4 {fa4_mode} is a backport layer: "
                         f"vLLM {vpin.version} (tune) has no such layer",
                         "build it without those options; vLLM carries PR #38835 itself")
    if fa_patch_dir is not None:
        return  # the caller's own series, named by its hash in the version: their call
    series = series_for(vpin.cute_tree_sha256)
    if series is None:
        raise ForgeError(f"no flash-attention series for vLLM {vpin.version}'s FA pin {vpin.fa_short} "
                         f"(tree {vpin.cute_tree_sha256[:12]})",
                         "port one with `vllm-forge refresh --fa-series --from 0.22.0 --to "
                         f"{vpin.version}`, or pass --fa-patches")
    why = series.validated()
    if why:
        local = accepted(vpin.cute_tree_sha256, series.hash, device_class)
        if local is not None:
            print(f"  series {series.dir.name} ({series.hash}) validated on {local.describe()}", file=sys.stderr)
            return
        why += f"; no passed `vllm-forge validate` record for it on {device_class} in {user_data_dir()}"
    if why and not allow_unvalidated:
        raise ForgeError(f"the flash-attention series {series.dir.name} for vLLM {vpin.version}'s FA pin "
                         f"{vpin.fa_short} is not GPU-validated: {why}",
                         f"run `vllm-forge validate` with a --allow-unvalidated build of it on an {device_class} "
                         "GPU, or pass --allow-unvalidated")
    if why:
        print(f"  warning: shipping series {series.dir.name} unvalidated ({why}): --allow-unvalidated",
              file=sys.stderr)
