"""`vllm-forge build-fa4-wheel`: a reproducible flash-attn-4 wheel of the pinned FA4 (+ patches).

PyPI's flash-attn-4 limits SM90 to head dim <= 256; this wheel carries the pinned fork's
flash_attn/cute (SM90 head dim <= 512 with paged KV), with upstream imports, so a separately
installed FA4 ("system FA4") can serve vLLM. Version: <upstream>+vllm.<pin7>[.p<patches7>].
"""

from __future__ import annotations

import json
import tempfile
import zipfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from installer.records import RecordEntry

from . import __version__
from .assemble import MemberWriter, zip_date_time
from .fa4 import CUTE, get_fa4_sources
from .fetch import Index
from .output import check_output_dir, publish, source_date_epoch, staged_output
from .patching import AppliedPatch
from .pins import FaPin, load_pins
from .series import series_hash


def fa4_wheel_version(fa: FaPin, patches: list[AppliedPatch]) -> str:
    """<upstream>+vllm.<pin7>, with .p<hash7> of the patch series when there is one."""
    label = f"vllm.{fa.short}"
    if patches:  # a patched tree is another build of the same commit
        label += ".p" + series_hash([p.sha256 for p in patches])
    return f"{fa.fa4_wheel.upstream_version}+{label}"


@dataclass(frozen=True)
class Fa4WheelResult:
    wheel: Path
    version: str


def build_fa4_wheel(out_dir: Path = Path("dist"), fa_src: str | None = None, index_url: str | None = None,
                    fa_patch_dir: Path | None = None) -> Fa4WheelResult:
    pins = load_pins()
    fa, spec = pins.fa, pins.fa.fa4_wheel
    check_output_dir(out_dir)
    with staged_output(out_dir) as temp, tempfile.TemporaryDirectory(prefix="vllm-forge-fa4-") as work:
        src = get_fa4_sources(fa, Path(work), cache(lambda: Index(index_url)), pins.index_project,
                              fa_src, fa_patch_dir)
        version = fa4_wheel_version(fa, src.patches)
        dist = spec.name.replace("-", "_")
        dist_info = f"{dist}-{version}.dist-info"
        epoch, _ = source_date_epoch(fa.commit_epoch, "the pin's commit date")
        metadata = "\n".join([
            "Metadata-Version: 2.4", f"Name: {spec.name}", f"Version: {version}",
            "Summary: FlashAttention 4 (CuTe DSL) from vllm-project/flash-attention"
            f"@{fa.commit[:12]}, built by vllm-forge",
            f"License-Expression: {spec.license}", f"Requires-Python: {spec.requires_python}",
            *[f"Requires-Dist: {r}" for r in spec.requires], "", ""])
        wheel_file = (f"Wheel-Version: 1.0\nGenerator: vllm-forge {__version__}\n"
                      "Root-Is-Purelib: true\nTag: py3-none-any\n")
        stamp = {"tool": f"vllm-forge {__version__}", "flash_attention": {
            "commit": fa.commit, "pin_tree_sha256": src.pin_tree_sha256, "tree_sha256": src.tree_sha256,
            "patches": [{"name": p.name, "sha256": p.sha256} for p in src.patches]},
            "source_date_epoch": epoch}
        tmp = temp(".whl.part")
        records: list[RecordEntry] = []
        with zipfile.ZipFile(tmp, "w") as zout:
            out = MemberWriter(zout, zip_date_time(epoch), records)
            for rel in sorted(src.upstream):
                out.write(f"{CUTE}/{rel}", src.upstream[rel])
            out.write(f"{dist_info}/METADATA", metadata.encode())
            out.write(f"{dist_info}/WHEEL", wheel_file.encode())
            out.write(f"{dist_info}/top_level.txt", b"flash_attn\n")
            out.write(f"{dist_info}/vllm_forge.json", (json.dumps(stamp, indent=2, sort_keys=True) + "\n").encode())
            out.write_record(f"{dist_info}/RECORD")
        final = out_dir / f"{dist}-{version}-py3-none-any.whl"
        publish(tmp, final)
    return Fa4WheelResult(final, version)

