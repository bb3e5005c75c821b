"""The runtime layer of a forged wheel: ``vllm/_forge_runtime.py`` (from vllm_overlay/runtime/),
loaded by vLLM as a general plugin through an entry point in the wheel's entry_points.txt.
It sets FA4 serving defaults (kernel cache on disk, start-up compile, 64-token pages for head > 256
on SM90); see the module's docstring. Release-independent: every hook it needs is looked up at
run time and skipped with a log line where a release lacks it."""

from __future__ import annotations

import configparser
import hashlib
import io

from .errors import ForgeError
from .pins import data_dir

MODULE = "vllm/_forge_runtime.py"
GROUP = "vllm.general_plugins"
NAME = "forge"
TARGET = "vllm._forge_runtime:register"


def runtime_source() -> bytes:
    path = data_dir() / "vllm_overlay" / "runtime" / "_forge_runtime.py"
    try:
        return path.read_bytes()
    except OSError:
        raise ForgeError(f"runtime layer {path} is missing",
                         "reinstall vllm-forge, or fix the copy VLLM_FORGE_DATA_DIR points at") from None


def runtime_stamp(source: bytes) -> dict[str, str]:
    return {"file": MODULE, "sha256": hashlib.sha256(source).hexdigest(), "entry_point": f"{GROUP}:{NAME}={TARGET}"}


def _parser(text: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(delimiters=("=",), interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]  # entry point names are case-sensitive
    cp.read_string(text)
    return cp


def add_entry_point(text: str) -> str:
    """entry_points.txt with our plugin added (the release's own groups and entries kept, in order)."""
    cp = _parser(text)
    if not cp.has_section(GROUP):
        cp.add_section(GROUP)
    cp.set(GROUP, NAME, TARGET)
    out = io.StringIO()
    cp.write(out)
    return out.getvalue()


def has_entry_point(text: str) -> bool:
    cp = _parser(text)
    return cp.has_section(GROUP) and cp.get(GROUP, NAME, fallback=None) == TARGET
