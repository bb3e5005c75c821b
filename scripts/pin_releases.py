#!/usr/bin/env python3
"""Pin vLLM releases from the package index: wheel, sdist, flash-attention pin, FA4 tree.

  python scripts/pin_releases.py [--versions 0.19.1 0.22.0 ...] [--out build/releases] [--index-url URL]

For each release: the x86_64 abi3 wheel pip would install (highest build tag), the sdist; from the
sdist the flash-attention GIT_TAG, the torch pin and FA4's requirement lines; from the wheel (HTTP
range requests only) the `vllm/vllm_flash_attn/cute` tree hash (fa4.tree_sha256), the three backport
base files and whether they carry vLLM PR #38835 (overlay.carries_fix), and the wheel's FA4
Requires-Dist. Writes OUT/releases.json and OUT/cute/<fa-commit-7>/flash_attn/cute/ (upstream form),
prints a table. Resumable: sdists and the wheels' members read are cached under cache_dir().
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

from vllm_forge.fa4 import UPSTREAM_PKG, VLLM_PKG, WHEEL_CUTE, tree_sha256
from vllm_forge.fetch import Index, cache_dir, cached_download
from vllm_forge.overlay import carries_fix, sha256

VERSIONS = ["0.17.0", "0.17.1", "0.18.0", "0.18.1", "0.19.0", "0.19.1", "0.20.0", "0.20.1", "0.20.2",
            "0.21.0", "0.22.0", "0.22.1", "0.23.0", "0.24.0", "0.25.0", "0.25.1", "0.26.0", "0.27.0",
            "0.27.1", "0.28.0", "0.29.0", "0.30.0", "0.31.0", "0.32.0", "0.33.0"]
PROJECT = "vllm"
BASES = ("vllm/v1/attention/backends/flash_attn.py", "vllm/v1/attention/backends/fa_utils.py",
         "vllm/vllm_flash_attn/flash_attn_interface.py")
FA4_REQS = {"nvidia-cutlass-dsl", "quack-kernels", "apache-tvm-ffi", "torch-c-dlpack-ext", "einops"}
SELF_TEST = {"0.22.0": ("6bc68b2366a7943946d339d1ca1f1d9529a9775df6788d5daa35566792f81ba6", 48)}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pick_wheel(index: Index, version: str) -> tuple[str, str]:
    """The x86_64 cp38-abi3 manylinux wheel pip would install, and why."""
    found = []
    for name in index.files(PROJECT):
        if not name.endswith(".whl"):
            continue
        _, ver, build, tags = parse_wheel_filename(name)
        if ver == Version(version) and any(t.interpreter == "cp38" and t.abi == "abi3" and
                                           re.fullmatch(r"manylinux_\d+_\d+_x86_64", t.platform) for t in tags):
            found.append((build, name))
    if not found:
        raise SystemExit(f"no x86_64 cp38-abi3 manylinux wheel of vllm {version} on {index.url}")
    found.sort()
    (build, name), others = found[-1], found[:-1]
    if not others:
        return name, "only x86_64 wheel"
    if others[-1][0] == build:
        raise SystemExit(f"vllm {version}: several x86_64 wheels with one build tag: {found}")
    rest = ", ".join(f"build tag {b[0]}" if b else "the untagged upload" for b, _ in others)
    return name, f"build tag {build[0] if build else 'none'} over {rest}: pip prefers the highest build tag"


def entry_sha(index: Index, filename: str) -> tuple[str, int]:
    e = index.files(PROJECT)[filename]
    return str(e["hashes"]["sha256"]), int(e.get("size") or 0)  # type: ignore[index,call-overload]


def wheel_members(index: Index, wheel: str, sha: str) -> Path:
    """The wheel's cute tree, base files and METADATA, read by range requests, cached as a small zip."""
    path = cache_dir() / "pin-releases" / f"{wheel}.{sha[:16]}.members.zip"
    if path.is_file():
        return path
    remote = index.open_remote(PROJECT, wheel, sha)
    zf = zipfile.ZipFile(remote)
    infos = sorted(zf.infolist(), key=lambda i: i.header_offset)
    nxt = {a.header_offset: b.header_offset for a, b in itertools.pairwise(infos)}
    cute = [i for i in infos if i.filename.startswith(WHEEL_CUTE + "/") and not i.is_dir()]
    meta = [i for i in infos if re.fullmatch(r"vllm-[^/]+\.dist-info/METADATA", i.filename)]
    groups = [cute] + [[i] for i in infos if i.filename in BASES] + [meta]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.part")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
        for group in filter(None, groups):  # one request per contiguous span
            remote.prefetch(min(i.header_offset for i in group),
                            max(nxt.get(i.header_offset, remote.size) for i in group))
            for i in group:
                out.writestr(i.filename, zf.read(i))
    log(f"  {wheel}: {remote.fetched / 1e6:.1f} MB by range requests")
    os.replace(tmp, path)
    return path


def strip_marker(line: str) -> str:
    return line.split("#", 1)[0].split(";", 1)[0].strip()


def read_sdist(path: Path, version: str) -> dict[str, Any]:
    root = f"vllm-{version}/"
    cmake = "cmake/external_projects/vllm_flash_attn.cmake"
    want = {cmake, "requirements/cuda.txt", "requirements/common.txt", "requirements/build.txt"}
    text: dict[str, str] = {}
    with tarfile.open(path, "r:gz") as tf:
        for m in tf:
            if m.isfile() and m.name.startswith(root) and m.name[len(root):] in want:
                text[m.name[len(root):]] = tf.extractfile(m).read().decode()  # type: ignore[union-attr]
    tags = set(re.findall(r"GIT_TAG\s+([0-9a-f]{40})\b", text.get(cmake, "")))
    if len(tags) != 1:
        raise SystemExit(f"{path.name}: expected one 40-hex flash-attention GIT_TAG, found {sorted(tags)}")
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
    return {"flash_attention_commit": tags.pop(), "torch": next(iter(torch), ""), "fa4_requires": list(reqs),
            "fa4_requires_from": reqs, "flags": flags}


def read_wheel(members: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    with zipfile.ZipFile(members) as zf:
        files = {n: zf.read(n) for n in zf.namelist()}
    cute = {n[len(WHEEL_CUTE) + 1:]: d for n, d in files.items() if n.startswith(WHEEL_CUTE + "/")}
    py = {p: d for p, d in cute.items() if p.endswith(".py")}
    meta = next((d.decode() for n, d in files.items() if n.endswith(".dist-info/METADATA")), "")
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    bases = {p: files.get(p, b"") for p in BASES}
    return {
        "wheel_requires_fa4": [r for r in requires if canonicalize_name(Requirement(r).name) in FA4_REQS],
        "cute_tree_sha256": tree_sha256(py) if py else None,
        "cute_file_count": len(py),
        "cute_non_py": sorted(p for p in cute if not p.endswith(".py")),
        "base_files": {p: sha256(d) if d else None for p, d in bases.items()},
        "carries_pr38835": carries_fix(bases),
    }, py


def upstream_form(py: dict[str, bytes], where: str) -> dict[str, bytes]:
    out = {}
    for p, data in py.items():
        up = data.replace(VLLM_PKG.encode(), UPSTREAM_PKG.encode())
        if up.replace(UPSTREAM_PKG.encode(), VLLM_PKG.encode()) != data:
            raise SystemExit(f"{where}: {p} does not round-trip to upstream form")
        out[p] = up
    return out


def pin(index: Index, version: str, out: Path, stored: dict[str, str]) -> dict[str, Any]:
    wheel, choice = pick_wheel(index, version)
    wsha, wsize = entry_sha(index, wheel)
    sdist = f"vllm-{version}.tar.gz"
    ssha, _ = entry_sha(index, sdist)
    log(f"{version}: {wheel} ({choice})")
    rec: dict[str, Any] = {"wheel": wheel, "wheel_sha256": wsha, "wheel_size": wsize, "wheel_choice": choice,
                           "sdist": sdist, "sdist_sha256": ssha}
    rec |= read_sdist(cached_download(lambda: index, PROJECT, sdist, ssha), version)
    info, py = read_wheel(wheel_members(index, wheel, wsha))
    rec |= info
    if version in SELF_TEST and (rec["cute_tree_sha256"], rec["cute_file_count"]) != SELF_TEST[version]:
        raise SystemExit(f"self-test failed: {version} cute tree {rec['cute_tree_sha256']} / {len(py)} files")
    if py:
        fa7, h = rec["flash_attention_commit"][:7], rec["cute_tree_sha256"]
        if fa7 not in stored:
            shutil.rmtree(out / "cute" / fa7, ignore_errors=True)
        if stored.setdefault(fa7, h) != h:
            rec["flags"].append(f"cute tree differs from another release with FA pin {fa7}: stored as {fa7}-{h[:12]}")
            fa7 = f"{fa7}-{h[:12]}"
        dest = out / "cute" / fa7 / "flash_attn" / "cute"
        for p, data in upstream_form(py, wheel).items():
            (dest / p).parent.mkdir(parents=True, exist_ok=True)
            (dest / p).write_bytes(data)
    else:
        rec["flags"].append(f"wheel has no {WHEEL_CUTE}/*.py")
    return rec


def short(reqs: list[str], name: str) -> str:
    return next((r[len(name):] or "(any)" for r in reqs if canonicalize_name(Requirement(r).name) == name), "-")


def table(releases: dict[str, dict[str, Any]]) -> str:
    head = ("version", "wheel tag", "FA pin", "tree hash", "files", "torch", "cutlass-dsl", "quack", "PR#38835")
    rows = [head]
    for v, r in releases.items():
        _, _, build, tags = parse_wheel_filename(r["wheel"])
        tag = next(iter(tags)).platform.removesuffix("_x86_64") + (f" build {build[0]}" if build else "")
        reqs = r["fa4_requires"]
        rows.append((v, tag, r["flash_attention_commit"][:8], (r["cute_tree_sha256"] or "-")[:12],
                     str(r["cute_file_count"]), r["torch"].removeprefix("torch=="),
                     short(reqs, "nvidia-cutlass-dsl").split("]")[-1], short(reqs, "quack-kernels"),
                     "yes" if r["carries_pr38835"] else "no"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join(" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--versions", nargs="+", default=VERSIONS)
    ap.add_argument("--out", type=Path, default=Path("build/releases"))
    ap.add_argument("--index-url")
    args = ap.parse_args()
    index = Index(args.index_url)
    stored: dict[str, str] = {}
    releases = {v: pin(index, v, args.out, stored) for v in sorted(args.versions, key=Version)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "releases.json").write_text(json.dumps(releases, indent=2) + "\n")
    print(table(releases))
    for v, r in releases.items():
        for flag in r["flags"]:
            print(f"  {v}: {flag}")
    log(f"wrote {args.out / 'releases.json'} and {args.out / 'cute'}/")


if __name__ == "__main__":
    main()
