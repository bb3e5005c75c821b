#!/usr/bin/env python3
"""Prepare what `vllm-forge validate` needs on the GPU machine for every series (no network), under .device/series/.

  python scripts/gpu_series_bundle.py [--releases 0.20.0,0.22.0,...]

For each release (default: the newest release of every FA cute tree that has a series, see
patches/flash-attention/manifest.json), read through the tool's own verified mirror chain
(the release wheel by HTTP range requests, tree-hash checked):
  stock-<pin7>.zip   the release's vllm/vllm_flash_attn/ (__init__.py, flash_attn_interface.py, cute/)
  forged-<pin7>.zip  the same with the pin's series applied (what `build` ships) and the stamp `build`
                     writes (vllm-<version>.dist-info/vllm_forge.json): `validate --wheel` / `--stock-wheel`
                     read these as they read the wheels, tree hash checked
and that release's FA4 runtime packages, resolved by pip from its requirements/cuda.txt lines
(pins.json `fa4_requires`) — cutlass-dsl, quack-kernels, apache-tvm-ffi, torch-c-dlpack-ext, einops:
  wheels/                 their wheels, as downloaded (plan.json: each set's wheels in install order)
  batchNN/                the carry of one device call each (<= 58 MiB): pieces `<file>.<offset>`, larger
                          wheels split; compressing them again costs more time than the extra calls
  plan.json; batch00/SHA256SUMS (of every whole file: the GPU machine checks them)
scripts/gpu_series_device.py runs `vllm-forge validate` on each there.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from functools import cache
from pathlib import Path

from gpu_carry import write_batches
from packaging.utils import canonicalize_name

from vllm_forge.fa4 import WHEEL_CUTE, fa_target, get_fa4_sources, no_series
from vllm_forge.fetch import Index
from vllm_forge.pins import load_pins
from vllm_forge.series import read_manifest, series_for
from vllm_forge.verify import STAMP

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / ".device" / "series"
CARRY = re.compile(r"^(nvidia-cutlass-dsl.*|quack-kernels|apache-tvm-ffi|torch-c-dlpack-ext|einops|"
                   r"cuda-(python|bindings|core|pathfinder)|nvidia-cuda-nvdisasm)$", re.I)
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]


def default_releases() -> list[str]:
    pins = load_pins()
    trees = set(read_manifest()["series"])
    newest: dict[str, str] = {}
    for v, vp in pins.vllm.items():  # pins.json lists releases oldest first
        if vp.plan == "tune" and vp.cute_tree_sha256 in trees:
            newest[vp.cute_tree_sha256] = v
    return sorted(newest.values(), key=lambda v: tuple(map(int, v.split("."))))


@cache
def resolve_runtime(lines: tuple[str, ...]) -> list[str]:
    """name==version of FA4's runtime packages as pip resolves the release's lines today, against
    this environment's torch (the GPU machine brings its own torch: resolving torch's CUDA
    dependencies would take minutes and decide nothing here)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "r.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--report", str(report),
                        "--only-binary=:all:", *lines], check=True)
        items = json.loads(report.read_text())["install"]
    names = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"] for i in items}
    if "nvidia-cutlass-dsl-libs-cu13" in names:  # the [cu13] extra: the CUDA 12 libraries are never loaded
        names.pop("nvidia-cutlass-dsl-libs-cu12", None)
    return sorted(f"{n}=={v}" for n, v in names.items() if CARRY.match(n))


def download(specs: list[str], dest: Path) -> list[str]:
    """The wheels of specs, in the order pip would install them (libs-base before the [cu13] libraries,
    whose identical paths must win)."""
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp",
                    *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(dest), *specs], check=True)
    names = []
    for spec in specs:
        name, version = spec.split("==")
        found = [w.name for w in dest.glob("*.whl") if canonicalize_name(w.name.split("-")[0]) == name
                 and w.name.split("-")[1] == version]
        assert len(found) == 1, (spec, found)
        names.append(found[0])
    return sorted(names, key=lambda n: ("libs_cu1" in n, n))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--releases", help="comma-separated (default: newest release of each tree with a series)")
    ap.add_argument("--runtime-only", action="store_true")
    args = ap.parse_args()
    pins = load_pins()
    index = cache(lambda: Index())
    releases = args.releases.split(",") if args.releases else default_releases()
    OUT.mkdir(parents=True, exist_ok=True)
    plan: dict[str, dict[str, object]] = {}
    zips: list[Path] = []
    runtimes: dict[str, list[str]] = {}
    for v in releases:
        vp = pins.for_version(v)
        target = fa_target(pins, vp)
        series = series_for(target.cute_tree_sha256)
        assert series is not None, f"{v}: no series"
        rt = resolve_runtime(vp.fa4_requires)
        name = next(s.split("==")[1] for s in rt if s.lower().startswith("nvidia-cutlass-dsl=="))
        runtimes.setdefault(f"cutlass-{name}", rt)
        if runtimes[f"cutlass-{name}"] != rt:  # same cutlass-dsl, other quack/tvm-ffi: a set of its own
            name = f"{name}-{v}"
            runtimes[f"cutlass-{name}"] = rt
        plan[target.short] = {"release": v, "tree_sha256": target.cute_tree_sha256, "series": series.hash,
                              "series_dir": series.dir.name, "runtime": f"cutlass-{name}", "runtime_pkgs": rt}
        print(f"{v}: pin {target.short}, series {series.dir.name} ({series.hash}), runtime {rt}", file=sys.stderr)
        if args.runtime_only:
            continue
        remote = index().open_remote(pins.index_project, vp.wheel, vp.wheel_sha256)
        with zipfile.ZipFile(remote) as zf:  # type: ignore[arg-type]
            own = {n: zf.read(n) for n in ("vllm/vllm_flash_attn/__init__.py",
                                          "vllm/vllm_flash_attn/flash_attn_interface.py")}
        with tempfile.TemporaryDirectory() as tmp:
            before = get_fa4_sources(target, Path(tmp) / "b", index, pins.index_project,
                                     patch_dir=no_series(Path(tmp)))
            after = get_fa4_sources(target, Path(tmp) / "a", index, pins.index_project, patch_dir=series.dir)
        plan[target.short]["after_tree_sha256"] = after.tree_sha256
        stamp = {"vllm": {"version": v}, "plan": vp.plan, "flash_attention": {
            "commit": target.commit, "pin_tree_sha256": target.cute_tree_sha256, "tree_sha256": after.tree_sha256,
            "patches": [{"name": p.name, "sha256": p.sha256} for p in after.patches]}}
        for side, src in (("stock", before), ("forged", after)):
            zips.append(OUT / f"{side}-{target.short}.zip")
            with zipfile.ZipFile(zips[-1], "w", zipfile.ZIP_DEFLATED) as zf:
                for n, data in sorted(own.items()):
                    zf.writestr(zipfile.ZipInfo(n, (1980, 1, 1, 0, 0, 0)), data)
                for rel, data in sorted(src.files.items()):
                    zf.writestr(zipfile.ZipInfo(f"{WHEEL_CUTE}/{rel}", (1980, 1, 1, 0, 0, 0)), data)
                if side == "forged":
                    zf.writestr(zipfile.ZipInfo(f"vllm-{v}.dist-info/{STAMP}", (1980, 1, 1, 0, 0, 0)),
                                json.dumps(stamp, indent=1, sort_keys=True))
    wheels = OUT / "wheels"
    wheels.mkdir(exist_ok=True)
    sets = {name: download(specs, wheels) for name, specs in runtimes.items()}
    for spec in plan.values():
        spec["runtime_wheels"] = sets[str(spec["runtime"])]
    if args.runtime_only:
        return 0
    (OUT / "plan.json").write_text(json.dumps(plan, indent=1, sort_keys=True) + "\n")
    # carry batches: plan + the trees + the small wheels first, then each set's large wheels
    order = [OUT / "plan.json", *zips]
    every = [w for name in sets for w in sets[name]]
    by_size = sorted(dict.fromkeys(every), key=lambda w: (wheels / w).stat().st_size > 16 << 20)
    order += [wheels / w for w in by_size]
    write_batches(order, OUT)  # SHA256SUMS of every whole file into batch00
    return 0


if __name__ == "__main__":
    sys.exit(main())
