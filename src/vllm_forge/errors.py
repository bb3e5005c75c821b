"""The one error type of vllm-forge, and the classification of everything else that can end a command.

A refusal is a `ForgeError` (a message naming the thing, and what to do next): printed as one line
`vllm-forge: error: <what> -- <what to do>`, exit status 2. `refusal()` maps the exceptions that
hostile input or a starved machine raise anywhere (resource exhaustion, filesystem oddities, damaged
archives or text) to such a line; anything else that escapes a command is a vllm-forge bug (cli.py).
"""

from __future__ import annotations

import errno
import json
import zipfile
import zlib


class ForgeError(Exception):
    """A refusal: printed as one line on stderr, exit status 2."""

    def __init__(self, what: str, hint: str = "") -> None:
        self.what = what
        self.hint = hint
        super().__init__(f"{what}" + (f" -- {hint}" if hint else ""))


class MissingMember(ForgeError, KeyError):
    """An archive member that is not there. Also a KeyError, so `except KeyError` around
    `zf.read(name)` keeps working; uncaught, it is a one-line refusal naming the archive."""

    def __str__(self) -> str:  # KeyError would quote the message
        return Exception.__str__(self)


# errno -> what to do; the resource ones are never the network's or the input's fault
OS_HINTS = {
    errno.ENOSPC: "free space on that filesystem (or point --out / TMPDIR elsewhere) and run again",
    errno.EDQUOT: "your disk quota is full; free space or point --out / TMPDIR elsewhere",
    errno.EFBIG: "a file size limit (ulimit -f) is smaller than the output; raise it and run again",
    errno.EACCES: "check the permissions of that path, or choose another",
    errno.EPERM: "check the permissions of that path, or choose another",
    errno.EROFS: "that filesystem is read-only; choose a writable path",
    errno.ENOENT: "check that the path exists",
    errno.ENOTDIR: "a component of that path is a file, not a directory; check the path",
    errno.EISDIR: "that path is a directory; give a file",
    errno.EMFILE: "this process may open too few files (ulimit -n); raise it (e.g. ulimit -n 4096) and run again",
    errno.ENFILE: "the system's open-file table is full; close other programs or raise fs.file-max, then run again",
    errno.ENOMEM: "out of memory; raise the memory limit (ulimit -v) or free memory, then run again",
    errno.EAGAIN: "raise the memory limit (ulimit -v) or the process limit (ulimit -u), or wait, then run again",
    errno.ELOOP: "that path is a symbolic-link loop (or links too deep); replace the link with a file or directory",
    errno.ENAMETOOLONG: "use a shorter path",
    errno.EXDEV: "that path crosses filesystems in an unexpected way; keep --out and the cache on one filesystem",
    errno.EPIPE: "the program reading vllm-forge's output exited first; keep it reading to the end",
    errno.EIO: "the disk reported an I/O error; check that device (dmesg) before running again",
}

RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN})


def _describe(e: OSError) -> str:
    return e.strerror or str(e)


def os_error_line(e: OSError) -> str:
    """One `<what> -- <what to do>` line for an OSError that reached the command line."""
    what = _describe(e)
    if e.filename is not None:
        what += f": {e.filename}"
        if e.filename2 is not None:
            what += f" -> {e.filename2}"
    hint = OS_HINTS.get(e.errno or 0, "check that path and the free space, then run again")
    return f"{what} -- {hint}"


def resource_cause(e: BaseException | None) -> OSError | MemoryError | None:
    """The resource exhaustion (EMFILE, ENFILE, ENOMEM, EAGAIN, MemoryError) behind e, following
    causes and URLError reasons: a failure that no other mirror or retry can cure, and whose hint must
    not send the user to the network."""
    seen = 0
    while e is not None and seen < 16:
        seen += 1
        if isinstance(e, MemoryError):
            return e
        if isinstance(e, OSError) and e.errno in RESOURCE_ERRNOS:
            return e
        if isinstance(e, RuntimeError) and "can't start new thread" in str(e):
            return OSError(errno.EAGAIN, "cannot start a thread (no memory for its stack, or too many processes)")
        reason = getattr(e, "reason", None)  # urllib.error.URLError
        e = reason if isinstance(reason, BaseException) else (e.__cause__ or e.__context__)
    return None


def resource_refusal(e: BaseException) -> ForgeError | None:
    """A ForgeError for resource exhaustion behind e (see resource_cause), else None."""
    cause = resource_cause(e)
    if cause is None:
        return None
    if isinstance(cause, MemoryError):
        return ForgeError("out of memory (MemoryError)", OS_HINTS[errno.ENOMEM])
    return ForgeError(os_error_line(cause).split(" -- ")[0], OS_HINTS[cause.errno or errno.ENOMEM])


def refusal(e: BaseException) -> ForgeError | None:
    """The one-line refusal for an exception that escaped a command, or None: a vllm-forge bug.

    Known classes: ForgeError itself; resource exhaustion (MemoryError, EMFILE/ENFILE/ENOMEM,
    no thread); any OSError (errno hint: ELOOP, EACCES, ENOSPC...); damaged archives and text the
    command read (a bad zip or CRC, a broken deflate stream, bytes that are not UTF-8, text that is
    not JSON); numbers out of range. Where the code knows which file it read, it raises a ForgeError
    naming it; these are the backstop for the places it does not."""
    if isinstance(e, ForgeError):
        return e
    resource = resource_refusal(e)
    if resource is not None:
        return resource
    if isinstance(e, OSError):
        what, hint = os_error_line(e).split(" -- ", 1)
        return ForgeError(what, hint)
    check = "check the files given to this command (and the download cache); if they are sound, report it"
    if isinstance(e, (zipfile.BadZipFile, zlib.error, EOFError)):
        return ForgeError(f"a zip archive is corrupt or truncated ({type(e).__name__}: {e})", check)
    if isinstance(e, UnicodeDecodeError):
        return ForgeError(f"a file that must be UTF-8 text is not ({e})", check)
    if isinstance(e, json.JSONDecodeError):
        return ForgeError(f"a file that must be JSON is not ({e})", check)
    if isinstance(e, OverflowError):
        return ForgeError(f"a number is out of range ({e})", "check the numbers given in arguments and environment")
    return None
