"""GPU validation records in the user's data directory: written by `vllm-forge validate`, read by `build`'s gate.

A record says: this flash-attention series (the FA pin's cute tree hash + the series hash) passed
the kernel checks on this device (name, compute capability, driver, runtime versions). `build`
ships a `tune` release's series by default when the tool's own manifest record passed (made by the
project) or when a record here passed for the same pin tree, series and device class (`sm90`: the
compute capability, which decides what FA4 compiles). No GPU library is imported here.

Where: $VLLM_FORGE_USER_DATA_DIR, else $XDG_DATA_HOME/vllm-forge, else ~/.local/share/vllm-forge;
records under validations/. (VLLM_FORGE_DATA_DIR is the tool's own data: pins.json, patches.)
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ForgeError
from .output import write_text_atomic

FORMAT = 1
RECORDS = "validations"


def user_data_dir() -> Path:
    override = os.environ.get("VLLM_FORGE_USER_DATA_DIR")
    if override:
        return Path(override)
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".local" / "share") / "vllm-forge"


def device_class(capability: tuple[int, int] | list[int]) -> str:
    """(9, 0) -> 'sm90': H100, H200, H800, H20 and GH200 are one class; FA4 compiles per capability."""
    major, minor = capability
    return f"sm{int(major)}{int(minor)}"


def check_device_class(name: str) -> str:
    if not re.fullmatch(r"sm\d{2,3}", name):
        raise ForgeError(f"--device-class {name!r}", "give the compute capability as sm<major><minor>, e.g. sm90")
    return name


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower() or "device"


def record_path(record: dict[str, Any], root: Path | None = None) -> Path:
    d = record["device"]
    name = f"{record['pin_tree_sha256'][:12]}-{record['series'] or 'none'}-{d['class']}-{slug(d['name'])}.json"
    return (root or user_data_dir()) / RECORDS / name


def check_record(record: Any) -> dict[str, Any]:
    """The fields the gate relies on, with their types; raises ValueError naming the first bad one."""
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"not a format-{FORMAT} validation record")
    for key, kind in (("pin_tree_sha256", str), ("series", str), ("passed", bool), ("vllm", str),
                      ("device", dict), ("runtime", dict), ("checks", list), ("date", str)):
        if not isinstance(record.get(key), kind):
            raise ValueError(f"field {key!r} missing or not {kind.__name__}")
    if not re.fullmatch(r"[0-9a-f]{64}", record["pin_tree_sha256"]):
        raise ValueError("pin_tree_sha256 is not a sha256")
    for key in ("name", "class", "capability", "driver"):
        if key not in record["device"]:
            raise ValueError(f"device.{key} missing")
    if not re.fullmatch(r"sm\d+", str(record["device"]["class"])):
        raise ValueError("device.class is not sm<major><minor>")
    return record  # type: ignore[no-any-return]


def write_record(record: dict[str, Any], root: Path | None = None) -> Path:
    """Atomically, beside any earlier record of another device; the same device's earlier one is replaced."""
    check_record(record)
    path = record_path(record, root)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(record, indent=2, sort_keys=True) + "\n")
    except OSError as e:
        raise ForgeError(f"cannot write the validation record {path}: {e.strerror or e}",
                         "set VLLM_FORGE_USER_DATA_DIR to a writable directory") from None
    return path


@dataclass(frozen=True)
class Found:
    path: Path
    record: dict[str, Any]

    def describe(self) -> str:
        d = self.record["device"]
        return f"{d['name']} (sm{d['class'][2:]}, driver {d['driver']}) on {self.record['date']}, {self.path}"


def find_records(pin_tree_sha256: str, series: str, dev_class: str, root: Path | None = None) -> list[Found]:
    """Every readable record of that series on that device class, passed or not (unreadable ones are skipped)."""
    folder = (root or user_data_dir()) / RECORDS
    found = []
    for path in sorted(folder.glob(f"{pin_tree_sha256[:12]}-*.json")) if folder.is_dir() else []:
        try:
            rec = check_record(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
        if (rec["pin_tree_sha256"], rec["series"], rec["device"]["class"]) == (pin_tree_sha256, series, dev_class):
            found.append(Found(path, rec))
    return found


def accepted(pin_tree_sha256: str, series: str, dev_class: str, root: Path | None = None) -> Found | None:
    """A passed record of this series on this device class, if there is one."""
    return next((f for f in find_records(pin_tree_sha256, series, dev_class, root) if f.record["passed"]), None)
