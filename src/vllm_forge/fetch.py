"""Stage 2, fetch/verify: files from the package index, cached and sha256-checked.

The index is the one pip uses (``--index-url``, ``PIP_INDEX_URL`` or pip's default),
read through the PEP 691 JSON simple API. Downloads land in the cache only after their
sha256 matched the pin; a cached file is re-hashed on every use.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from .errors import ForgeError, resource_refusal

CHUNK = 4 << 20
MAX_PAGE = 64 << 20  # PyPI's JSON page of vllm (every release, every file) is ~130 kB
TIMEOUT_S = 60


def cache_dir() -> Path:
    """~/.cache/vllm-forge (XDG_CACHE_HOME honoured; VLLM_FORGE_CACHE overrides)."""
    explicit = os.environ.get("VLLM_FORGE_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "vllm-forge"


# pip's own default (pip._internal.models.index.PyPI.simple_url). Not imported from pip: importing
# pip in this process (Python < 3.12) makes setuptools' distutils shim hand out the standard
# library's distutils for the rest of the process, and a later `import setuptools` (torch's
# cpp_extension, a build backend) then fails its own assertion.
PYPI_SIMPLE_URL = "https://pypi.org/simple/"


def default_index_url() -> str:
    """--index-url's default: VLLM_FORGE_INDEX_URL, PIP_INDEX_URL, else PyPI (pip's default)."""
    return os.environ.get("VLLM_FORGE_INDEX_URL") or os.environ.get("PIP_INDEX_URL") or PYPI_SIMPLE_URL


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def check_digest(got: str, expected: str, what: str,
                 hint: str = "the file is corrupt, truncated or another release; delete it and fetch again") -> None:
    """The one sha256 refusal: names the thing, both digests, and what to do."""
    if got != expected:
        raise ForgeError(f"sha256 mismatch for {what}: expected {expected}, got {got}", hint)


def check_sha256(path: Path, expected: str, what: str) -> None:
    check_digest(sha256_file(path), expected, f"{what} {path}")


def safe_member_name(name: str, origin: str) -> PurePosixPath:
    """Refuse archive member names that would escape the tree they are unpacked in."""
    p = PurePosixPath(name)
    if (
        not name
        or "\\" in name
        or "\x00" in name
        or p.is_absolute()
        or ".." in p.parts
        or (len(name) > 1 and name[1] == ":")
    ):
        raise ForgeError(
            f"unsafe archive member name {name!r} in {origin}",
            "refusing to unpack an archive whose members escape its tree",
        )
    return p


class RangesUnsupported(ForgeError):
    """The server does not answer HTTP range requests: download the whole file instead."""


class Progress:
    """A download/copy progress line on stderr, at most a few updates a second."""

    def __init__(self, label: str, total: int | None) -> None:
        self.label, self.total, self.done = label, total, 0
        self._last = 0.0
        self._start = time.monotonic()

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= 0.5 or (self.total and self.done >= self.total):
            self._last = now
            mb = self.done / 1e6
            rate = mb / max(now - self._start, 1e-6)
            pct = f" {100 * self.done / self.total:5.1f}%" if self.total else ""
            print(f"\r  {self.label}:{pct} {mb:8.1f} MB ({rate:6.1f} MB/s)",
                  end="", file=sys.stderr, flush=True)
            Progress.line_open = True

    def close(self) -> None:
        end_progress_line()

    line_open = False  # a progress line without its newline is on stderr


def end_progress_line() -> None:
    """End a progress line cut short (by an error), so that the next message starts a line."""
    if Progress.line_open:
        print(file=sys.stderr, flush=True)
        Progress.line_open = False


class Index:
    """The package index, PEP 691 JSON simple API."""

    def __init__(self, url: str | None = None) -> None:
        self.url = (url or default_index_url()).rstrip("/") + "/"
        self._pages: dict[str, dict[str, dict[str, object]]] = {}

    def _open(self, url: str, headers: dict[str, str] | None = None) -> BinaryIO:
        req = urllib.request.Request(url, headers=headers or {})
        try:
            return urllib.request.urlopen(req, timeout=TIMEOUT_S)  # type: ignore[no-any-return]
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:
            refused = resource_refusal(e)  # too few descriptors or no memory: not the network's fault
            if refused is not None:
                raise refused from None
            raise ForgeError(
                f"cannot reach the package index at {url}: {e}",
                "check the network or --index-url; cached and local inputs need no network",
            ) from e

    def files(self, project: str) -> dict[str, dict[str, object]]:
        if project not in self._pages:
            url = self.url + project + "/"
            try:
                with self._open(url, {"Accept": "application/vnd.pypi.simple.v1+json"}) as r:
                    body = r.read(MAX_PAGE + 1)  # an endless page must not fill the memory
                if len(body) > MAX_PAGE:
                    raise ValueError(f"the page is larger than {MAX_PAGE} bytes")
                page = json.loads(body)
                files = page["files"]
                if not isinstance(files, list) or not all(
                        isinstance(f, dict) and isinstance(f.get("filename"), str) and isinstance(f.get("url"), str)
                        for f in files):
                    raise ValueError("an entry of 'files' is not an object with a string filename and url")
                self._pages[project] = {f["filename"]: f for f in files}
            except ForgeError:
                raise
            except (ValueError, KeyError, TypeError, OSError, http.client.HTTPException) as e:
                refused = resource_refusal(e)
                if refused is not None:
                    raise refused from None
                raise ForgeError(f"the package index at {url} gave no usable PEP 691 JSON page "
                                 f"({type(e).__name__}: {e})",
                                 "check --index-url (a simple API that serves JSON, e.g. https://pypi.org/simple/)"
                                 ) from None
        return self._pages[project]

    def file_url(self, project: str, filename: str, sha256: str) -> str:
        entry = self.files(project).get(filename)
        if entry is None:
            raise ForgeError(f"{filename} is not on the package index {self.url}{project}/",
                             "check the pin in pins.json or use --base-wheel")
        hashes = entry.get("hashes")
        listed = hashes.get("sha256") if isinstance(hashes, dict) else None
        if listed and listed != sha256:
            raise ForgeError(f"the index lists sha256 {listed} for {filename}, the pin says {sha256}",
                             "the index or the pin is wrong; do not build from it")
        return urllib.parse.urljoin(self.url + project + "/", str(entry["url"]))

    def download(self, project: str, filename: str, sha256: str, dest: Path) -> Path:
        """Download into dest (a directory) atomically; the file appears only if its sha256 matches."""
        url = self.file_url(project, filename, sha256)
        target = dest / filename
        h = hashlib.sha256()
        try:
            dest.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=dest, prefix=f".{filename}.", suffix=".part")
        except OSError as e:
            raise ForgeError(f"cannot write the download cache {dest}: {e.strerror or e}",
                             "set VLLM_FORGE_CACHE (or XDG_CACHE_HOME) to a writable directory") from None
        try:
            with os.fdopen(fd, "wb") as out, self._open(url) as r:
                length = r.headers.get("Content-Length")  # type: ignore[attr-defined]
                total = int(length) if length and length.isdigit() else None
                progress = Progress(f"downloading {filename}", total)
                try:
                    while chunk := _read_body(r, url, progress.done):
                        h.update(chunk)
                        out.write(chunk)
                        progress.advance(len(chunk))
                finally:
                    progress.close()
                if total is not None and progress.done != total:
                    raise ForgeError(f"the download of {filename} from {url} was cut off after "
                                     f"{progress.done} of {total} bytes",
                                     "run again (nothing was cached); check the network or --index-url")
            check_digest(h.hexdigest(), sha256, f"downloaded {filename}",
                         "the download was corrupt or the index serves another file; try again")
            if target.is_symlink() or (target.exists() and not target.is_file()):  # a link loop, a directory
                evict(target, "is not a regular file", "replacing it with the download")
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    def open_remote(self, project: str, filename: str, sha256: str) -> RemoteFile:
        return RemoteFile(self.file_url(project, filename, sha256), self._open)


def _read_body(r: BinaryIO, url: str, done: int, size: int = CHUNK) -> bytes:
    """The next chunk of a response body (at most size bytes: a server sending more is not read
    further); a dropped or timed-out connection is one ForgeError."""
    try:
        return r.read(size)
    except (OSError, http.client.HTTPException) as e:
        raise ForgeError(f"the download from {url} broke off after {done} bytes: {type(e).__name__}: {e}",
                         "run again (nothing was cached); check the network or --index-url") from None


def evict(path: Path, why: str = "failed its sha256", then: str = "downloading again",
          label: str | None = None) -> None:
    """Remove a bad cache entry (a file or a tree) and say so, in one line."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    print(f"vllm-forge: cached {label or path.name} {why}; evicted, {then}", file=sys.stderr, flush=True)


def clear_cache_slot(path: Path, is_dir: bool = False) -> None:
    """Evict what stands where a cache entry belongs and cannot be one: a file where a directory
    belongs (the entry's parent, or the entry when is_dir), a directory or a dangling link where a
    file belongs. Run before the entry is read or written, so that the cache repairs itself."""
    parent = path.parent
    if (parent.exists() or parent.is_symlink()) and not parent.is_dir():
        evict(parent, "is not a directory", "making it again")
    if path.exists() or path.is_symlink():
        if is_dir and not path.is_dir():
            evict(path, "is not a directory", "fetching it again")
        elif not is_dir and not path.is_file():
            evict(path, "is not a file", "downloading again")


def cached_download(index: Callable[[], Index], project: str, filename: str, sha256: str) -> Path:
    """The pinned file from the cache (re-verified; a corrupt one is evicted), else from the index."""
    path = cache_dir() / "dl" / filename
    clear_cache_slot(path)
    if path.is_file():
        if sha256_file(path) == sha256:
            return path
        evict(path)
    return index().download(project, filename, sha256, path.parent)


def pinned_wheel_source(index: Callable[[], Index], project: str, filename: str, sha256: str,
                        then: str = "reading it from the index") -> tuple[Path | RemoteFile, str]:
    """Where to read members of a pinned wheel from, and how it came: the download cache's copy if it is
    intact (a corrupt one is evicted, saying `then`), else the index by HTTP range requests (only the
    members read come over), else, from an index without ranges, the whole file into the cache."""
    cached = cache_dir() / "dl" / filename
    clear_cache_slot(cached)
    if cached.is_file():
        if sha256_file(cached) == sha256:
            return cached, "cache"
        evict(cached, then=then)
    try:
        return index().open_remote(project, filename, sha256), "range requests"
    except RangesUnsupported:
        return cached_download(index, project, filename, sha256), "download"


class RemoteFile(io.RawIOBase):
    """A read-only, seekable view of a remote file through HTTP range requests.

    zipfile reads only the central directory and the members asked for, so a few MB
    of a large wheel come over the network instead of all of it.
    """

    def __init__(self, url: str, opener: Callable[..., BinaryIO]) -> None:
        self.url, self._opener, self._pos = url, opener, 0
        with opener(url, {"Range": "bytes=-1"}) as r:
            crange = r.headers.get("Content-Range", "")  # type: ignore[attr-defined]
            if getattr(r, "status", 200) != 206 or "/" not in crange:
                raise RangesUnsupported(f"{url} does not serve byte ranges", "falling back to a full download")
            total = crange.rsplit("/", 1)[1].strip()
            if not (total.isascii() and total.isdigit() and 0 < len(total) <= 15):  # "*", junk, petabytes
                raise RangesUnsupported(f"{url} answers a range request with Content-Range {crange[:60]!r}",
                                        "falling back to a full download")
            self.size = int(total)
        self.fetched = 0
        self._span = (0, b"")

    def prefetch(self, start: int, end: int) -> None:
        """Fetch [start, end) in one request; later reads inside it need no network."""
        with self._opener(self.url, {"Range": f"bytes={start}-{end - 1}"}) as r:
            data = _read_body(r, self.url, 0, end - start)
            if len(data) != end - start or getattr(r, "status", 206) != 206:
                raise ForgeError(f"{self.url} answered bytes {start}-{end - 1} with {len(data)} bytes "
                                 f"(status {getattr(r, 'status', '?')})", "the index serves byte ranges wrongly; "
                                 "check --index-url")
            self._span = (start, data)
        self.fetched += len(self._span[1])

    def prefetch_members(self, zf: zipfile.ZipFile, members: list[zipfile.ZipInfo]) -> None:
        """Fetch in one request the span of the archive that holds these members: from the first one's
        local header to the end of the last one's data (the next member's header, or the file's end)."""
        if not members:
            return
        nxt = dict(itertools.pairwise(sorted(i.header_offset for i in zf.infolist())))
        self.prefetch(min(i.header_offset for i in members),
                      max(nxt.get(i.header_offset, self.size) for i in members))

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, b: bytearray) -> int:  # type: ignore[override]
        n = min(len(b), self.size - self._pos)
        if n <= 0:
            return 0
        start, span = self._span
        if start <= self._pos and self._pos + n <= start + len(span):
            b[:n] = span[self._pos - start : self._pos - start + n]
            self._pos += n
            return n
        with self._opener(self.url, {"Range": f"bytes={self._pos}-{self._pos + n - 1}"}) as r:
            data = _read_body(r, self.url, 0, n)
        if getattr(r, "status", 206) != 206 or not data:
            raise ForgeError(f"{self.url} answered bytes {self._pos}-{self._pos + n - 1} with {len(data)} bytes "
                             f"(status {getattr(r, 'status', '?')})",
                             "the index serves byte ranges wrongly; check --index-url")
        data = data[:n]
        b[: len(data)] = data
        self._pos += len(data)
        self.fetched += len(data)
        return len(data)
