"""The two FA4 sides of an A/B in one process, and the import paths of pip --target directories (no torch).

vLLM's `vllm/vllm_flash_attn/` (its `__init__`, `flash_attn_interface` and the FA4 `cute/` tree) is
read from a wheel and written as a package of another name (`vllmstock.vllm_flash_attn`, imports
rewritten as vLLM's CMake rewrites `flash_attn.cute`), so the stock tree of a release loads beside
the forged one. The compiled FA2/FA3 extensions are not needed by FA4 and are registered empty.
"""

from __future__ import annotations

import json
import sys
import types
import zipfile
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

from ..errors import ForgeError
from ..fetch import Index, pinned_wheel_source, safe_member_name
from ..pins import VllmPin, load_pins

FA_DIR = "vllm/vllm_flash_attn/"
STOCK_PKG = "vllmstock"
FORGED_PKG = "vllmforged"


def runtime_path(rt: Path) -> list[str]:
    """A pip --target directory plus what its .pth files add (pip --target does not read them)."""
    paths = [str(rt)]
    # cutlass-dsl's own .pth: python_packages (4.4) or dsl_packages (4.5+), whichever this set has
    paths += [str(d) for d in sorted(rt.glob("nvidia_cutlass_dsl/*_packages")) if d.is_dir()]
    for pth in sorted(rt.glob("*.pth")):
        for ln in pth.read_text().splitlines():
            if ln and not ln.startswith(("#", "import")) and (rt / ln).is_dir():
                paths.append(str((rt / ln).resolve()))
    return list(dict.fromkeys(paths))


def fa_files(zf: zipfile.ZipFile, origin: str) -> dict[str, bytes]:
    """vllm/vllm_flash_attn/**.py of a vLLM wheel, by path below vllm/vllm_flash_attn/."""
    files = {str(safe_member_name(i.filename[len(FA_DIR):], origin)): zf.read(i) for i in zf.infolist()
             if i.filename.startswith(FA_DIR) and i.filename.endswith(".py")}
    if "flash_attn_interface.py" not in files:
        raise ForgeError(f"{origin} has no {FA_DIR}flash_attn_interface.py", "give a vLLM wheel")
    return files


def write_renamed(files: dict[str, bytes], dest: Path, package: str) -> Path:
    """files as the package `package`.vllm_flash_attn under dest; returns dest (for sys.path)."""
    for rel, data in files.items():
        out = dest / package / "vllm_flash_attn" / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data.replace(b"vllm.vllm_flash_attn", f"{package}.vllm_flash_attn".encode()))
    return dest


def stub_extensions(package: str) -> None:
    """Empty `_vllm_fa2_C` / `_vllm_fa3_C` for a renamed tree: FA4 needs neither, a call to one fails loudly."""
    for ext in ("_vllm_fa2_C", "_vllm_fa3_C"):
        sys.modules.setdefault(f"{package}.vllm_flash_attn.{ext}", types.ModuleType(ext))


def stock_files(vpin: VllmPin, stock_wheel: Path | None, index_url: str | None) -> tuple[dict[str, bytes], str]:
    """The release's own vllm_flash_attn: from --stock-wheel (the wheel, or a zip holding only its
    vllm/vllm_flash_attn/), the download cache, or the index by range requests; whichever delivered it,
    its cute tree must hash to the release's pin."""
    from ..fa4 import tree_sha256
    project = load_pins().index_project
    if stock_wheel is not None:
        if not stock_wheel.is_file():
            raise ForgeError(f"stock wheel {stock_wheel} does not exist", "give the release's vLLM wheel")
        try:
            zf, origin = zipfile.ZipFile(stock_wheel), str(stock_wheel)
        except (OSError, zipfile.BadZipFile) as e:
            raise ForgeError(f"cannot read --stock-wheel {stock_wheel}: {e}", "give the release's wheel") from None
    else:
        try:
            source, how = pinned_wheel_source(lambda: Index(index_url), project, vpin.wheel, vpin.wheel_sha256)
        except OSError as e:
            raise ForgeError(f"vLLM {vpin.version}'s wheel is neither in the download cache nor reachable: {e}",
                             f"pass --stock-wheel with {vpin.wheel}") from None
        zf, origin = zipfile.ZipFile(source), f"{'cache' if how == 'cache' else 'index'} {vpin.wheel}"  # type: ignore[arg-type]
    with zf:
        files = fa_files(zf, origin)
    if tree_sha256(cute_of(files)) != vpin.cute_tree_sha256:
        raise ForgeError(f"the FA4 tree of {origin} does not hash to vLLM {vpin.version}'s pin",
                         "the file is not that release's wheel")
    return files, origin


def wheel_stamp(wheel: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """vllm-forge's stamp and the vllm_flash_attn files of a forged wheel."""
    from ..verify import STAMP  # here, not at the top: `bench` uses this module without GitPython/installer
    try:
        with zipfile.ZipFile(wheel) as zf:
            name = next((n for n in zf.namelist() if n.endswith(f".dist-info/{STAMP}")), None)
            if name is None:
                raise ForgeError(f"{wheel} has no {STAMP}: not a vllm-forge wheel", "give a wheel `build` made")
            return json.loads(zf.read(name)), fa_files(zf, str(wheel))
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        raise ForgeError(f"cannot read {wheel}: {e}", "give a wheel `build` made") from None


@cache
def installed_stamp() -> dict[str, Any]:
    """The stamp of the vLLM importable here (after --path entries were added)."""
    from ..verify import STAMP
    try:
        dist = metadata.distribution("vllm")
    except metadata.PackageNotFoundError:
        raise ForgeError("no vLLM is installed here", "install the forged wheel, add its pip --target "
                         "directory with --path, or give --wheel") from None
    text = dist.read_text(STAMP)
    if text is None:
        raise ForgeError(f"the vLLM {dist.version} installed here is not a vllm-forge wheel (no {STAMP})",
                         "install the forged wheel, or give it with --wheel")
    return json.loads(text)  # type: ignore[no-any-return]


def cute_of(files: dict[str, bytes]) -> dict[str, bytes]:
    return {k[len("cute/"):]: v for k, v in files.items() if k.startswith("cute/")}

