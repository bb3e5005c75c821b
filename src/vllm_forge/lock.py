"""`vllm-forge lock`: a hash-pinned requirements file for installing a forged wheel with
`pip install --require-hashes` (the runtime image's install).

pip resolves the wheel and its dependencies for the interpreter that runs it (`pip install
--dry-run --report`, pip >= 22.2); every distribution it chose becomes `name==version
--hash=sha256:...`, the forged wheel itself a path line with its own hash. Resolve with the
interpreter and platform the lock is for (the Dockerfile runs it in the builder, on the
runtime's Ubuntu and Python)."""

from __future__ import annotations

import errno
import json
import platform as host
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion

from .assemble import check_wheel_name
from .errors import OS_HINTS, ForgeError
from .fetch import sha256_file
from .output import check_output_dir, check_target, publish, staged_output
from .pins import load_pins

# pip's own failures for want of resources: its hint must not send the user to the network
RESOURCE_SIGNS = (("Too many open files", OS_HINTS[errno.EMFILE]), ("MemoryError", OS_HINTS[errno.ENOMEM]),
                  ("Cannot allocate memory", OS_HINTS[errno.ENOMEM]),
                  ("No space left on device", OS_HINTS[errno.ENOSPC]))


def resolve(wheel: Path, python: str, pip_args: list[str], constraints: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """pip's installation report for `wheel` (all of it, nothing installed), under `constraints`."""
    with tempfile.TemporaryDirectory(prefix="vllm-forge-lock-") as tmp:
        report = Path(tmp) / "report.json"
        if any(a.startswith("--platform") for a in pip_args):  # pip takes platform options only with a target
            pip_args = [*pip_args, "--target", str(Path(tmp) / "target")]
        if constraints:
            constraint_file = Path(tmp) / "constraints.txt"
            constraint_file.write_text("\n".join(constraints) + "\n")
            pip_args = [*pip_args, "--constraint", str(constraint_file)]
        cmd = [python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report",
               str(report), *pip_args, str(wheel)]
        print(f"resolving {wheel.name} and its dependencies with pip (needs the package index)", file=sys.stderr)
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, check=False)
        except OSError as e:
            raise ForgeError(f"cannot run {python}: {e.strerror or e}",
                             "give --python the path of a Python interpreter with pip") from None
        if r.returncode != 0:
            tail = " | ".join(ln for ln in r.stderr.strip().splitlines() if not ln.startswith("WARNING"))[-600:]
            hint = next((h for sign, h in RESOURCE_SIGNS if sign in r.stderr),
                        "check the network/index (--index-url) and that pip >= 22.2 runs this")
            raise ForgeError(f"pip could not resolve {wheel.name}: {tail}", hint)
        try:
            items: list[dict[str, Any]] = json.loads(report.read_text())["install"]
            for item in items:
                item["metadata"]["name"], item["metadata"]["version"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ForgeError(f"pip's installation report is unreadable ({type(e).__name__}: {e})",
                             "check that --python runs pip >= 22.2") from None
    return items


_PLAIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+!_-]*$")


def lock_lines(wheel: Path, items: list[dict[str, Any]], wheel_ref: str) -> list[str]:
    own = canonicalize_name(wheel.name.split("-")[0])
    lines, seen_own = [], False
    for item in sorted(items, key=lambda i: canonicalize_name(i["metadata"]["name"])):
        name, version = canonicalize_name(item["metadata"]["name"]), item["metadata"]["version"]
        if not _PLAIN.match(str(name)) or not _PLAIN.match(str(version)):  # they go into the file: plain only
            raise ForgeError(f"pip's report names {str(name)[:60]!r} {str(version)[:60]!r}", "check the index")
        if name == own:
            seen_own = True
            lines.append(f"{wheel_ref} \\\n    --hash=sha256:{sha256_file(wheel)}")
            continue
        sha = item.get("download_info", {}).get("archive_info", {}).get("hashes", {}).get("sha256")
        if not sha:
            where = item.get("download_info", {}).get("url", "?")
            raise ForgeError(f"{name} {version} comes from {where}, which has no sha256 to pin",
                             "install it from an index or a wheel file")
        if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise ForgeError(f"pip's report gives {name} {version} the sha256 {str(sha)[:70]!r}", "check the index")
        lines.append(f"{name}=={version} \\\n    --hash=sha256:{sha}")
    if not seen_own:
        raise ForgeError(f"pip's report does not contain {wheel.name}", "is it a wheel of a project pip can install?")
    return lines


def check_wheel_ref(ref: str) -> str:
    """The wheel's line in a requirements file is the ref itself: refuse what pip would read as more
    than a path or URL (a control character or newline starts a new line, e.g. an `--extra-index-url`
    option; a leading `-` is an option; ` #` starts a comment; `${VAR}` is expanded; whitespace
    splits the line into options)."""
    bad = next((c for c in ref if ord(c) < 0x20 or ord(c) == 0x7F or c.isspace()), None)
    why = (f"contains {bad!r}" if bad is not None else "is empty" if not ref
           else "starts with '-' (pip reads an option)" if ref.startswith("-")
           else "contains '#' (pip reads a comment)" if "#" in ref
           else "contains '${' (pip expands environment variables)" if "${" in ref else "")
    if why:
        raise ForgeError(f"--wheel-ref {ref[:80]!r} {why}",
                         "give a plain path or URL of the wheel (percent-encode spaces and '#' in a URL)")
    return ref


def platform_args(wheel: Path, platform: str | None) -> list[str]:
    """pip's options to resolve for the wheel's machine (x86_64, aarch64) when it is not this one's:
    the wheel's own platform tags, binary distributions only (pip cannot build for another machine)."""
    try:
        plats = sorted({t.platform for t in parse_wheel_filename(wheel.name)[3]})
    except (InvalidWheelFilename, InvalidVersion) as e:
        raise ForgeError(f"{wheel.name} is not a wheel file name ({e})", "give the path of a forged wheel") from None
    machine = "aarch64" if any(p.endswith("_aarch64") for p in plats) else "x86_64"
    if platform is not None and platform != machine:
        raise ForgeError(f"{wheel.name} is a {machine} wheel, not {platform}",
                         f"lock it with --platform {machine} (or without --platform)")
    if machine == {"arm64": "aarch64", "AMD64": "x86_64"}.get(host.machine(), host.machine()):
        return []
    accepted: list[str] = []  # older pips take each platform literally: the wheel's glibc and every older one
    for p in plats:
        m = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", p)
        accepted += ([f"manylinux_2_{y}_{m.group(2)}" for y in range(int(m.group(1)), 16, -1)]
                     + [f"manylinux2014_{m.group(2)}"]) if m else [p]
    return ["--only-binary=:all:", *(f"--platform={p}" for p in dict.fromkeys(accepted))]



def locked_dependencies(lines: list[str], wheel_ref: str) -> list[str]:
    """The lock's lines without the wheel itself: what the image installs first, in its own layer
    (it changes only when a dependency does, not when the wheel is forged again)."""
    return [ln for ln in lines if not ln.startswith(f"{wheel_ref} \\\n")]


def dependency_triples(lines: list[str], wheel_ref: str) -> list[tuple[str, str, str]]:
    """(name, version, sha256) of every locked dependency, read back from the lock's lines."""
    out = []
    for ln in locked_dependencies(lines, wheel_ref):
        spec, sha = ln.split(" \\\n    --hash=sha256:")
        name, version = spec.split("==", 1)
        out.append((name, version, sha))
    return out


def lock(wheel: Path, out: Path, wheel_ref: str | None = None, python: str | None = None,
         index_url: str | None = None, tested: bool = True, dependencies_out: Path | None = None,
         sbom_out: Path | None = None, platform: str | None = None) -> Path:
    """tested: constrain FA4's runtime packages to pins.json's `tested_with` (the set measured on
    the H100); otherwise pip takes the newest versions FA4's ranges admit. dependencies_out: the
    same lock without the wheel (installed as its own image layer); sbom_out: CycloneDX JSON of both."""
    if not wheel.is_file():
        raise ForgeError(f"{wheel} does not exist", "give the path of a forged wheel")
    check_wheel_name(wheel.name, "wheel")
    check_wheel_ref(wheel_ref if wheel_ref is not None else str(wheel))
    outs = [("--out", out), ("--dependencies-out", dependencies_out), ("--sbom-out", sbom_out)]
    for flag, path in outs:
        if path is None:
            continue
        if path.is_dir():
            raise ForgeError(f"{flag} {path} is a directory", "give the path of the file to write")
        check_output_dir(path.parent, f"the directory of {flag}")
        check_target(path, flag)  # a device, FIFO or socket is refused, not replaced
    pip_args = (["--index-url", index_url] if index_url else []) + platform_args(wheel, platform)
    items = resolve(wheel.resolve(), python or sys.executable, pip_args, load_pins().fa.tested_with if tested else ())
    wheel_ref = wheel_ref or str(wheel)
    lines = lock_lines(wheel, items, wheel_ref)
    texts: list[tuple[Path, str]] = []
    header = (f"# vllm-forge lock: {wheel.name} and its {len(lines) - 1} dependencies, hash-pinned\n"
              "# install with: pip install --require-hashes --no-deps -r <this file>\n")
    texts.append((out, header + "\n".join(lines) + "\n"))
    if dependencies_out is not None:
        deps = locked_dependencies(lines, wheel_ref)
        # no wheel name here: the image layer made from this file stays the same across re-forges
        texts.append((dependencies_out, f"# vllm-forge lock: {len(deps)} dependencies, hash-pinned (the forged "
                      "wheel itself: --no-deps, after these)\n" + "\n".join(deps) + "\n"))
    if sbom_out is not None:
        from .docker import wheel_stamp
        from .output import source_date_epoch
        from .sbom import sbom_json

        try:
            made = json.loads(wheel_stamp(wheel))["source_date_epoch"]
        except (StopIteration, KeyError, ValueError, OSError, zipfile.BadZipFile):
            raise ForgeError(f"{wheel.name} has no vllm-forge stamp", "an SBOM is made for a forged wheel") from None
        epoch, _ = source_date_epoch(int(made), "the forged wheel's source date epoch")
        texts.append((sbom_out, sbom_json(wheel.name, sha256_file(wheel), dependency_triples(lines, wheel_ref), epoch)))
    for path, text in texts:  # all made before any is written
        with staged_output(path.parent, "the directory of --out") as temp:
            staged = temp(path.suffix or ".txt")
            staged.write_text(text)
            publish(staged, path)
    print(f"locked {len(lines)} distributions", file=sys.stderr)
    return out
