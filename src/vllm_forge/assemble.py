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
import struct
import time
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from email.parser import HeaderParser
from pathlib import Path
from typing import BinaryIO

from installer.records import Hash, InvalidRecordEntry, RecordEntry, parse_record_file
from packaging.requirements import InvalidRequirement, Requirement
from packaging.tags import Tag, parse_tag
from packaging.utils import canonicalize_name, parse_wheel_filename

from .errors import ForgeError, MissingMember, resource_refusal
from .fetch import CHUNK, Progress, safe_member_name

FILE_MODE = 0o100644 << 16


# Members read into memory are small (dist-info, overlay files, the FA4 tree: < 1 MB each); a member
# declaring more is refused before it is inflated, so memory never grows with a hostile member.
MAX_READ = 64 << 20
MAX_MEMBER = 4 << 30  # the largest member of a real vLLM wheel is ~470 MB (_C.abi3.so)
MAX_RATIO = 200  # deflate reaches ~1030:1; real wheel members stay under 60:1
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, ValueError, struct.error, NotImplementedError,
               RuntimeError)  # RuntimeError: an encrypted member; NotImplementedError: an unknown method


class WheelZip(zipfile.ZipFile):
    """A zip archive read defensively: members whose declared size is absurd are refused on opening,
    `read` is bounded (MAX_READ) and turns a missing or corrupt member (bad CRC, broken deflate
    stream) into one ForgeError naming the archive. A missing member is also a KeyError."""

    origin: str = "archive"
    hint: str = "delete it and fetch it again"

    def read(self, name: str | zipfile.ZipInfo, pwd: bytes | None = None) -> bytes:
        try:
            info = name if isinstance(name, zipfile.ZipInfo) else self.getinfo(name)
        except KeyError:
            raise MissingMember(f"{self.origin} has no member {name}", self.hint) from None
        if info.file_size > MAX_READ:
            raise ForgeError(f"member {info.filename} of {self.origin} declares {info.file_size} bytes, more than "
                             f"vllm-forge reads into memory ({MAX_READ})", self.hint)
        try:
            return super().read(info, pwd)
        except _ZIP_ERRORS as e:
            raise ForgeError(f"member {info.filename} of {self.origin} is corrupt ({type(e).__name__}: {e})",
                             self.hint) from None

    def text(self, name: str) -> str:
        """A member that must be UTF-8 text."""
        data = self.read(name)
        try:
            return data.decode()
        except UnicodeDecodeError as e:
            raise ForgeError(f"{name} in {self.origin} is not UTF-8 text ({e.reason} at byte {e.start})",
                             self.hint) from None

    def check_sizes(self) -> None:
        """Refuse members whose declared size is absurd: a decompression bomb, or a lying directory."""
        for info in self.infolist():
            ratio = info.file_size / max(info.compress_size, 1)
            if info.file_size > MAX_MEMBER or (info.file_size > MAX_READ and ratio > MAX_RATIO):
                raise ForgeError(f"member {info.filename} of {self.origin} declares {info.file_size} bytes from "
                                 f"{info.compress_size} compressed: a decompression bomb or a damaged archive",
                                 self.hint)


def open_zip(file: str | Path | BinaryIO, origin: str, hint: str = "delete it and fetch it again") -> WheelZip:
    """A WheelZip over a path or a file object; a file that is no zip, or has unsafe member names or
    absurd sizes, is one ForgeError."""
    try:
        zf = WheelZip(file)
    except _ZIP_ERRORS as e:
        raise ForgeError(f"{origin} is corrupt or truncated: {e}", hint) from None
    except OSError as e:
        refused = resource_refusal(e)
        if refused is not None:
            raise refused from None
        raise ForgeError(f"{origin} is corrupt or truncated: {e}", hint) from None
    zf.origin, zf.hint = origin, hint
    try:
        for info in zf.infolist():
            safe_member_name(info.filename, origin)
        zf.check_sizes()
    except BaseException:
        zf.close()
        raise
    return zf


def open_wheel(path: Path, what: str = "base wheel",
               hint: str = "delete it and download it again") -> WheelZip:
    return open_zip(path, f"{what} {path}", hint)


def check_wheel_name(name: str, what: str) -> None:
    """Refuse a file name that is not a wheel's (PEP 427: name-version[-build]-python-abi-platform.whl)."""
    try:
        parse_wheel_filename(name)
    except Exception as e:  # noqa: BLE001  # packaging raises InvalidWheelFilename, InvalidVersion...
        raise ForgeError(f"{what} {name!r} is not a wheel file name ({e})",
                         "give a wheel with its file name as built (name-version-python-abi-platform.whl)") from None


def dist_info_dir(zf: zipfile.ZipFile, origin: str) -> str:
    dirs = {n.split("/", 1)[0] for n in zf.namelist() if n.split("/", 1)[0].endswith(".dist-info")}
    if len(dirs) != 1:
        raise ForgeError(f"{origin} has {len(dirs)} .dist-info directories", "not a valid wheel")
    return dirs.pop()


def member_text(zf: zipfile.ZipFile, name: str) -> str:
    """A member that must be UTF-8 text (of a WheelZip: bounded, and one ForgeError if it is not)."""
    if isinstance(zf, WheelZip):
        return zf.text(name)
    return zf.read(name).decode()


def metadata_version(zf: zipfile.ZipFile, dist_info: str) -> str:
    return str(HeaderParser().parsestr(member_text(zf, f"{dist_info}/METADATA"))["Version"])


def read_record(zf: zipfile.ZipFile, dist_info: str) -> dict[str, tuple[str, str]]:
    """RECORD as {path: (hash, size)}; a malformed row is one ForgeError naming it."""
    origin = getattr(zf, "origin", str(zf.filename))
    try:
        rows = {}
        for p, h, s in parse_record_file(member_text(zf, f"{dist_info}/RECORD").splitlines()):
            RecordEntry.from_elements(p, h, s)  # a bad hash or size is refused here, not mid-repack
            rows[p] = (h, s)
    except (InvalidRecordEntry, csv.Error) as e:
        issues = "; ".join(getattr(e, "issues", [])) or str(e)
        raise ForgeError(f"{dist_info}/RECORD of {origin} has a malformed row ({issues})",
                         getattr(zf, "hint", "not a valid wheel")) from None
    return rows


def read_base(path: Path, version: str, members: list[str]) -> tuple[dict[str, bytes], int]:
    """The given members of a base wheel and its METADATA timestamp (seconds, UTC), after
    checking it is the requested vLLM version."""
    with open_wheel(path) as zf:
        di = dist_info_dir(zf, path.name)
        got = metadata_version(zf, di)
        if got != version:
            raise ForgeError(f"base wheel {path.name} is vLLM {got}, not {version}",
                             f"pass the vLLM {version} wheel, or --vllm {got}")
        try:
            stamp = calendar.timegm((*zf.getinfo(f"{di}/METADATA").date_time, 0, 0, 0))
        except ValueError as e:  # month 0 or 15 in the member's DOS date
            raise ForgeError(f"{di}/METADATA of {path} has an invalid date ({e})", zf.hint) from None
        return {m: zf.read(m) for m in members if m in zf.NameToInfo}, stamp


def record_entry(path: str, data: bytes) -> RecordEntry:
    digest = hashlib.sha256(data).digest()
    value = base64.urlsafe_b64encode(digest).decode().rstrip("=")
    return RecordEntry(path, Hash("sha256", value), len(data))


def streamed_record_entry(zf: WheelZip, info: zipfile.ZipInfo) -> RecordEntry:
    """record_entry of a member of any size, hashed as it streams (memory does not grow with it)."""
    h, size = hashlib.sha256(), 0
    try:
        with zf.open(info) as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
                size += len(chunk)
    except _ZIP_ERRORS as e:
        raise ForgeError(f"member {info.filename} of {zf.origin} is corrupt ({type(e).__name__}: {e})",
                         zf.hint) from None
    value = base64.urlsafe_b64encode(h.digest()).decode().rstrip("=")
    return RecordEntry(info.filename, Hash("sha256", value), size)


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
    except (KeyError, UnicodeDecodeError):  # a WheelZip's MissingMember is a KeyError too
        raise ForgeError(f"{dist_info}/WHEEL is missing or unreadable", "not a valid wheel") from None
    try:
        tags = frozenset(t for ln in text.splitlines() if ln.startswith("Tag:") for t in parse_tag(ln[4:].strip()))
    except ValueError as e:  # a Tag line without three parts
        raise ForgeError(f"{dist_info}/WHEEL has a malformed Tag line ({e})", "not a valid wheel") from None
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
        base_record = read_record(zin, di)
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
                    records.append(streamed_record_entry(zin, info))
            zout.start_dir = raw.tell()
            zout._didModify = True  # type: ignore[attr-defined]  # raw-copied members: zipfile writes their directory

            out = MemberWriter(zout, date_time, records)
            for name in sorted(replace):
                out.write(name, replace[name])
            for name in sorted(add):
                out.write(name, add[name])
            meta = merge_requires(zin.text(f"{di}/METADATA"), names.version, requires)
            out.write(f"{names.dist_info}/METADATA", meta.encode())
            edits = dict(dist_info_edits or {})
            for info in zin.infolist():
                leaf = info.filename[len(di) + 1:]
                if info.filename.startswith(di + "/") and leaf not in ("METADATA", "RECORD"):
                    data = zin.read(info)
                    if leaf in edits:
                        data = edits.pop(leaf)(zin.text(info.filename)).encode()
                    out.write(f"{names.dist_info}/{leaf}", data)
            for leaf, edit in sorted(edits.items()):  # files the base lacks
                out.write(f"{names.dist_info}/{leaf}", edit("").encode())
            out.write(f"{names.dist_info}/{stamp[0]}", stamp[1])
            out.write_record(f"{names.dist_info}/RECORD")
    return names

