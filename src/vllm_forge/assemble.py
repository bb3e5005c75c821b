"""Stage 4, assemble: the forged wheel from the base wheel, without recompressing what did not change.

Unchanged members are copied as raw byte ranges (local header + compressed data) with
os.copy_file_range; only the overlay files, the FA4 tree and the dist-info are written anew.
The base wheel's sha256 is computed by a second thread during the copy, so the base is
read once. Every new member gets the timestamp of SOURCE_DATE_EPOCH.
"""

from __future__ import annotations

import base64
import calendar
import copy
import csv
import hashlib
import io
import os
import re
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from email.parser import HeaderParser
from pathlib import Path
from typing import BinaryIO

from installer.records import Hash, RecordEntry, parse_record_file
from packaging.requirements import InvalidRequirement, Requirement
from packaging.tags import Tag, parse_tag
from packaging.utils import canonicalize_name, parse_wheel_filename

from .errors import ForgeError
from .fetch import CHUNK, Progress, safe_member_name

FILE_MODE = 0o100644 << 16


def open_wheel(path: Path, what: str = "base wheel",
               hint: str = "delete it and download it again") -> zipfile.ZipFile:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ForgeError(f"{what} {path} is corrupt or truncated: {e}", hint) from None
    for info in zf.infolist():
        safe_member_name(info.filename, str(path))
    return zf


def dist_info_dir(zf: zipfile.ZipFile, origin: str) -> str:
    dirs = {n.split("/", 1)[0] for n in zf.namelist() if n.split("/", 1)[0].endswith(".dist-info")}
    if len(dirs) != 1:
        raise ForgeError(f"{origin} has {len(dirs)} .dist-info directories", "not a valid wheel")
    return dirs.pop()


def metadata_version(zf: zipfile.ZipFile, dist_info: str) -> str:
    return str(HeaderParser().parsestr(zf.read(f"{dist_info}/METADATA").decode())["Version"])


def read_base(path: Path, version: str, members: list[str]) -> tuple[dict[str, bytes], int]:
    """The given members of a base wheel and its METADATA timestamp (seconds, UTC), after
    checking it is the requested vLLM version."""
    with open_wheel(path) as zf:
        di = dist_info_dir(zf, path.name)
        got = metadata_version(zf, di)
        if got != version:
            raise ForgeError(f"base wheel {path.name} is vLLM {got}, not {version}",
                             f"pass the vLLM {version} wheel, or --vllm {got}")
        stamp = calendar.timegm((*zf.getinfo(f"{di}/METADATA").date_time, 0, 0, 0))
        return {m: zf.read(m) for m in members if m in zf.NameToInfo}, stamp


def record_entry(path: str, data: bytes) -> RecordEntry:
    digest = hashlib.sha256(data).digest()
    value = base64.urlsafe_b64encode(digest).decode().rstrip("=")
    return RecordEntry(path, Hash("sha256", value), len(data))


def merge_requires(metadata: str, new_version: str, requires: list[str]) -> str:
    """METADATA with the new Version and Requires-Dist merged with `requires` (specifier intersection)."""
    head, sep, body = metadata.partition("\n\n")
    lines = head.split("\n")
    todo = {canonicalize_name(Requirement(r).name): Requirement(r) for r in requires}
    merged: set[str] = set()
    last_req = max((i for i, ln in enumerate(lines) if ln.startswith("Requires-Dist:")), default=len(lines) - 1)
    for i, ln in enumerate(lines):
        if ln.startswith("Version:"):
            lines[i] = f"Version: {new_version}"
        elif ln.startswith("Requires-Dist:"):
            try:
                req = Requirement(ln.split(":", 1)[1].strip())
            except InvalidRequirement:
                continue
            key = canonicalize_name(req.name)
            if key in todo and (req.marker is None or "extra" not in str(req.marker)):
                req.specifier &= todo[key].specifier
                lines[i] = f"Requires-Dist: {req}"
                merged.add(key)
    extra = [f"Requires-Dist: {todo[k]}" for k in todo if k not in merged]
    lines[last_req + 1:last_req + 1] = extra
    return "\n".join(lines) + sep + body


class MemberWriter:
    """Writes new wheel members (fixed timestamp and mode) and collects their RECORD rows."""

    def __init__(self, zout: zipfile.ZipFile, date_time: tuple[int, ...], records: list[RecordEntry]) -> None:
        self.zout, self.date_time, self.records = zout, date_time, records

    def _put(self, name: str, data: bytes) -> None:
        zi = zipfile.ZipInfo(name, self.date_time)  # type: ignore[arg-type]
        zi.compress_type, zi.external_attr, zi.create_system = zipfile.ZIP_DEFLATED, FILE_MODE, 3
        self.zout.writestr(zi, data, compresslevel=6)

    def write(self, name: str, data: bytes) -> None:
        self._put(name, data)
        self.records.append(record_entry(name, data))

    def write_record(self, record_name: str) -> None:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerows(r.to_row() for r in self.records)
        writer.writerow((record_name, "", ""))
        self._put(record_name, buf.getvalue().encode())


def zip_date_time(epoch: int) -> tuple[int, ...]:
    return tuple(time.gmtime(max(epoch, 315532800))[:6])  # zip cannot go before 1980


@dataclass(frozen=True)
class Forged:
    filename: str
    version: str
    dist_info: str


def forged_names(base_name: str, label: str) -> Forged:
    """File, version and dist-info names of the wheel forged from base_name with a local label."""
    name, version, _build, _tags = parse_wheel_filename(base_name)
    new_version = f"{version.public}+{label}"
    tag_part = base_name[:-4].split("-", 2)[2]
    dist_name = str(name).replace("-", "_")
    return Forged(f"{dist_name}-{new_version}-{tag_part}.whl", new_version, f"{dist_name}-{new_version}.dist-info")


def _copy_range(src: BinaryIO, dst: BinaryIO, start: int, length: int, progress: Progress) -> None:
    dst.flush()
    sfd, dfd = src.fileno(), dst.fileno()
    pos = start
    while length > 0:
        try:
            n = os.copy_file_range(sfd, dfd, min(length, 1 << 30), pos)
        except OSError:  # e.g. across file systems on old kernels
            n = 0
        if n == 0:
            src.seek(pos)
            n = min(length, CHUNK)
            dst.write(src.read(n))
            dst.flush()
        pos += n
        length -= n
        progress.advance(n)
    dst.seek(0, os.SEEK_END)


def tag_family(tags: frozenset[Tag]) -> frozenset[tuple[str, str, str]]:
    """Tags up to the glibc/manylinux level of their platform: vLLM's release wheels declare
    cp38-abi3-linux_x86_64 in WHEEL and are published (renamed) as ..._manylinux_2_31_x86_64."""
    return frozenset((t.interpreter, t.abi, re.sub(r"^(many|musl)?linux(_\d+_\d+|\d+)?_", "", t.platform))
                     for t in tags)


def wheel_tags(zf: zipfile.ZipFile, dist_info: str) -> frozenset[Tag]:
    """The tags a wheel's own WHEEL file declares (what it installs on, whatever its file name says)."""
    try:
        text = zf.read(f"{dist_info}/WHEEL").decode()
    except (KeyError, UnicodeDecodeError):
        raise ForgeError(f"{dist_info}/WHEEL is missing or unreadable", "not a valid wheel") from None
    tags = frozenset(t for ln in text.splitlines() if ln.startswith("Tag:") for t in parse_tag(ln[4:].strip()))
    if not tags:
        raise ForgeError(f"{dist_info}/WHEEL declares no Tag", "not a valid wheel")
    return tags


def assemble(base: Path, out_tmp: Path, *, label: str, base_name: str,
             drop_prefixes: tuple[str, ...], replace: dict[str, bytes], add: dict[str, bytes],
             requires: list[str], stamp: tuple[str, bytes], epoch: int,
             dist_info_edits: dict[str, Callable[[str], str]] | None = None) -> Forged:
    """Write the forged wheel to out_tmp. Members under drop_prefixes and in replace are
    not copied; replace + add are written anew; dist-info is renamed, METADATA merged, RECORD
    regenerated. The output is named after base_name, the pinned file name (bound to the content
    by the sha256 the caller checks: build hashes it in parallel), never after the name the file
    was given; the tags of that name must be of the family the base's WHEEL declares."""
    date_time = zip_date_time(epoch)
    with open_wheel(base) as zin:
        di = dist_info_dir(zin, str(base))
        names = forged_names(base_name, label)
        declared = wheel_tags(zin, di)
        if tag_family(declared) != tag_family(parse_wheel_filename(base_name)[3]):
            raise ForgeError(f"base wheel {base.name} declares tags {', '.join(sorted(map(str, declared)))} "
                             f"in its WHEEL, not those of {base_name}",
                             "pass the pinned vLLM wheel (its sha256 is checked)")
        base_record = {p: (h, s) for p, h, s in parse_record_file(zin.read(f"{di}/RECORD").decode().splitlines())}
        infos = sorted(zin.infolist(), key=lambda i: i.header_offset)
        ends = [i.header_offset for i in infos[1:]] + [zin.start_dir]
        keep = [(i, e) for i, e in zip(infos, ends, strict=True)
                if not i.filename.startswith((di + "/", *drop_prefixes)) and i.filename not in replace]
        records: list[RecordEntry] = []
        total = sum(e - i.header_offset for i, e in keep)
        progress = Progress(f"repacking {base.name}", total)
        with open(base, "rb") as src, open(out_tmp, "wb") as raw, \
                zipfile.ZipFile(raw, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as zout:
            run_start = run_end = -1
            runs: list[tuple[int, int]] = []
            for info, end in keep:
                if info.header_offset != run_end:
                    if run_end > run_start:
                        runs.append((run_start, run_end))
                    run_start = info.header_offset
                run_end = end
            if run_end > run_start:
                runs.append((run_start, run_end))
            new_offset: dict[int, int] = {}
            for start, end in runs:
                out_start = raw.tell()
                _copy_range(src, raw, start, end - start, progress)
                new_offset[start] = out_start - start
            progress.close()
            shift = 0
            run_iter = iter(runs)
            current = next(run_iter, None)
            for info, _end in keep:
                while current is not None and not (current[0] <= info.header_offset < current[1]):
                    current = next(run_iter, None)
                assert current is not None
                shift = new_offset[current[0]]
                clone = copy.copy(info)
                clone.header_offset = info.header_offset + shift
                zout.filelist.append(clone)
                zout.NameToInfo[clone.filename] = clone
                if info.filename in base_record:
                    h, s = base_record[info.filename]
                    records.append(RecordEntry.from_elements(info.filename, h, s))
                else:
                    records.append(record_entry(info.filename, zin.read(info)))
            zout.start_dir = raw.tell()
            zout._didModify = True  # type: ignore[attr-defined]  # raw-copied members: zipfile writes their directory

            out = MemberWriter(zout, date_time, records)
            for name in sorted(replace):
                out.write(name, replace[name])
            for name in sorted(add):
                out.write(name, add[name])
            meta = merge_requires(zin.read(f"{di}/METADATA").decode(), names.version, requires)
            out.write(f"{names.dist_info}/METADATA", meta.encode())
            edits = dict(dist_info_edits or {})
            for info in zin.infolist():
                leaf = info.filename[len(di) + 1:]
                if info.filename.startswith(di + "/") and leaf not in ("METADATA", "RECORD"):
                    data = zin.read(info)
                    if leaf in edits:
                        data = edits.pop(leaf)(data.decode()).encode()
                    out.write(f"{names.dist_info}/{leaf}", data)
            for leaf, edit in sorted(edits.items()):  # files the base lacks
                out.write(f"{names.dist_info}/{leaf}", edit("").encode())
            out.write(f"{names.dist_info}/{stamp[0]}", stamp[1])
            out.write_record(f"{names.dist_info}/RECORD")
    return names

