"""Publishing outputs: hidden temp files in the output directory, renamed into place only when
complete, nothing left behind on failure; and the timestamp new files get."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ForgeError


def source_date_epoch(default: int, default_from: str) -> tuple[int, str]:
    """SOURCE_DATE_EPOCH if set, else a default derived from the inputs (same inputs, same bytes)."""
    env = os.environ.get("SOURCE_DATE_EPOCH")
    if not env:
        return default, default_from
    try:
        return int(env), "SOURCE_DATE_EPOCH"
    except ValueError:
        raise ForgeError(f"SOURCE_DATE_EPOCH={env!r} is not an integer",
                         "unset it or give seconds since 1970") from None


def fsync_path(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextmanager
def staged_output(out_dir: Path) -> Iterator[Callable[[str], Path]]:
    """Yields a maker of temp files in out_dir (hidden, mode as the umask allows). On any error they
    are removed, and out_dir too when this created it and it is empty; `publish` moves one into place."""
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    temps: list[Path] = []
    umask = os.umask(0)
    os.umask(umask)

    def temp(suffix: str) -> Path:
        fd, name = tempfile.mkstemp(dir=out_dir, prefix=".vllm-forge-", suffix=suffix)
        os.close(fd)
        path = Path(name)
        path.chmod(0o666 & ~umask)
        temps.append(path)
        return path

    try:
        yield temp
    except BaseException:
        for path in temps:
            path.unlink(missing_ok=True)
        if created and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise


def publish(temp: Path, final: Path) -> None:
    fsync_path(temp)
    os.replace(temp, final)
