"""Publishing outputs: hidden temp files in the output directory, renamed into place only when
complete, nothing left behind on failure; and the timestamp new files get.

A temp file's name carries its build's pid and a hash of its host name
(`.vllm-forge-p<pid>.<host8>.<random><suffix>`). A build killed before it could clean up (SIGKILL,
the OOM killer, a lost machine) leaves its temp files behind; the next build into the same
directory removes those whose build is gone (same host, pid no longer running). Temp files of live
builds, and of builds on other hosts sharing the directory, are left alone, so concurrent builds
into one directory both work.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OS_HINTS, ForgeError, _describe, os_error_line  # noqa: F401 (re-exported)

TEMP_PREFIX = ".vllm-forge-"
_TEMP_NAME = re.compile(r"^\.vllm-forge-p(\d+)\.([0-9a-f]{8})\.")


def source_date_epoch(default: int, default_from: str) -> tuple[int, str]:
    """SOURCE_DATE_EPOCH if set, else a default derived from the inputs (same inputs, same bytes)."""
    env = os.environ.get("SOURCE_DATE_EPOCH")
    if not env:
        return default, default_from
    return parse_epoch(env), "SOURCE_DATE_EPOCH"


# zip stores years 1980-2107; SOURCE_DATE_EPOCH's spec: a non-negative integer of seconds
MAX_EPOCH = 4354819199  # 2107-12-31T23:59:59Z


def parse_epoch(env: str) -> int:
    """SOURCE_DATE_EPOCH's value, refused unless 0 <= seconds <= the end of 2107 (what a zip date holds)."""
    text = env.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 12:
        what = "is not an integer" if not text.lstrip("-").isdigit() or not text.isascii() else "is out of range"
        raise ForgeError(f"SOURCE_DATE_EPOCH={env[:40]!r} {what}",
                         "unset it or give seconds since 1970 (0 to 4354819199, the end of 2107)")
    value = int(text)
    if value > MAX_EPOCH:
        raise ForgeError(f"SOURCE_DATE_EPOCH={value} is out of range (after 2107, which a zip date cannot hold)",
                         "unset it or give seconds since 1970 (0 to 4354819199, the end of 2107)")
    return value


def fsync_path(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def temp_prefix() -> str:
    """The name prefix of this process's temp files in an output directory."""
    return f"{TEMP_PREFIX}p{os.getpid()}.{_host_tag()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_temps(out_dir: Path) -> list[str]:
    """Remove the temp files (and temp directories) of dead builds of this host from out_dir."""
    host = _host_tag()
    removed: list[str] = []
    try:
        entries = list(out_dir.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP_NAME.match(entry.name)
        if not m or m.group(2) != host or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except FileNotFoundError:  # another build removed it first
            continue
        removed.append(entry.name)
    if removed:
        print(f"vllm-forge: removed {len(removed)} temp file(s) left in {out_dir} by a build that was "
              f"killed ({', '.join(sorted(removed))})", file=sys.stderr)
    return removed


def check_output_dir(out_dir: Path, what: str = "--out") -> None:
    """Refuse, before any work, an output directory that is a file or lies under one."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ForgeError(f"{what} {out_dir} exists and is not a directory",
                         "give a directory (it is created if missing), or move that file away")
    p = out_dir
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise ForgeError(f"cannot create {what} {out_dir}: a parent of it is a file, not a directory",
                         "give a path under a directory")


def make_output_dir(out_dir: Path, what: str = "--out") -> list[Path]:
    """Create out_dir (and missing parents); return the directories created, deepest first.
    A path that is a file, or a directory that cannot be created or written, is one ForgeError."""
    check_output_dir(out_dir, what)
    created: list[Path] = []
    p = out_dir
    while not p.exists() and not p.is_symlink() and p != p.parent:
        created.append(p)
        p = p.parent
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a dangling symlink
        raise ForgeError(f"{what} {out_dir} exists and is not a directory",
                         "give a directory (it is created if missing), or remove that link") from None
    except NotADirectoryError:
        raise ForgeError(f"cannot create {what} {out_dir}: a parent of it is a file, not a directory",
                         "give a path under a directory") from None
    except OSError as e:
        raise ForgeError(f"cannot create {what} {out_dir}: {_describe(e)}",
                         "choose a writable directory for " + what) from None
    return created  # not writable (EACCES, EROFS): the first temp file says so, with its errno


def _remove_created(created: list[Path]) -> None:
    """Remove the directories make_output_dir created, deepest first, while they are empty."""
    for d in created:
        try:
            d.rmdir()
        except OSError:  # not empty (another build uses it) or already gone
            return


class Staging:
    """Makes hidden temp files (and directories) in an output directory and remembers them."""

    def __init__(self, out_dir: Path, what: str) -> None:
        self.out_dir, self.what = out_dir, what
        self.temps: list[Path] = []
        self.prefix = temp_prefix()
        umask = os.umask(0)
        os.umask(umask)
        self.mode = 0o666 & ~umask

    def _refused(self, e: OSError) -> ForgeError:
        return ForgeError(f"cannot write in {self.what} {self.out_dir}: {_describe(e)}",
                          OS_HINTS.get(e.errno or 0, "choose a writable directory for " + self.what))

    def __call__(self, suffix: str) -> Path:
        try:
            fd, name = tempfile.mkstemp(dir=self.out_dir, prefix=self.prefix, suffix=suffix)
        except OSError as e:
            raise self._refused(e) from None
        os.close(fd)
        path = Path(name)
        self.temps.append(path)
        path.chmod(self.mode)
        return path

    def dir(self) -> Path:
        try:
            path = Path(tempfile.mkdtemp(dir=self.out_dir, prefix=self.prefix, suffix=".d"))
        except OSError as e:
            raise self._refused(e) from None
        self.temps.append(path)
        return path

    def discard(self) -> None:
        for path in self.temps:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


@contextmanager
def staged_output(out_dir: Path, what: str = "--out") -> Iterator[Staging]:
    """Yields a maker of temp files in out_dir (hidden, mode as the umask allows). On any error they
    are removed, and the directories this created too while they are empty; `publish` moves one into
    place. Temp files of killed builds in out_dir are removed first."""
    created = make_output_dir(out_dir, what)
    remove_stale_temps(out_dir)
    staging = Staging(out_dir, what)
    try:
        yield staging
    except BaseException:
        staging.discard()
        _remove_created(created)
        raise
    staging.discard()  # what was not published (nothing, normally)


def write_text_atomic(path: Path, text: str) -> None:
    """path's new text, or its old one: written to a hidden temp file beside it, renamed into place;
    the temp file is removed on failure."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_target(final: Path, what: str = "") -> None:
    """Refuse an output path that exists and is neither a regular file nor a link: a directory, a
    device (/dev/null), a FIFO or a socket is not replaced by a file."""
    try:
        st = final.lstat()
    except FileNotFoundError:
        return
    except OSError as e:
        raise ForgeError(f"cannot use {what or 'output'} {final}: {_describe(e)}",
                         OS_HINTS.get(e.errno or 0, "check that path")) from None
    if stat.S_ISDIR(st.st_mode):
        raise ForgeError(f"{what or 'output'} {final} is a directory", "move it away; the output goes there")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        kind = ("a character device" if stat.S_ISCHR(st.st_mode) else "a block device" if stat.S_ISBLK(st.st_mode)
                else "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "not a regular file")
        raise ForgeError(f"{what or 'output'} {final} exists and is {kind}",
                         "give the path of a regular file (or a new one); vllm-forge does not replace it")


def publish(temp: Path, final: Path) -> None:
    publish_together([(temp, final)])


def publish_together(pairs: list[tuple[Path, Path]]) -> None:
    """Move temp files into place, all or none: every target is checked first, every temp synced;
    if a later rename fails, the ones already made are undone (an earlier file there is restored)."""
    for _temp, final in pairs:
        check_target(final)
    for temp, _final in pairs:
        fsync_path(temp)
    done: list[tuple[Path, Path | None]] = []  # (final, a hard link to what it replaced)
    try:
        for temp, final in pairs:
            backup = None
            if len(pairs) > 1 and final.is_file() and not final.is_symlink():
                backup = temp.with_name(temp.name + ".prev")  # a temp name: a killed build's is removed
                try:
                    os.link(final, backup)
                except OSError:
                    backup = None
            try:
                os.replace(temp, final)
            except BaseException:
                if backup is not None:
                    backup.unlink(missing_ok=True)
                raise
            done.append((final, backup))
    except IsADirectoryError as e:
        _undo(done)
        raise ForgeError(f"{e.filename2 or e.filename} is a directory", "move it away; the output goes there") from None
    except BaseException:
        _undo(done)
        raise
    for _final, backup in done:
        if backup is not None:
            backup.unlink(missing_ok=True)


def _undo(done: list[tuple[Path, Path | None]]) -> None:
    for final, backup in reversed(done):
        if backup is not None:
            os.replace(backup, final)
        else:
            final.unlink(missing_ok=True)
