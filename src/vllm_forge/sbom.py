"""The SBOM of an image: CycloneDX 1.6 JSON (cyclonedx-python-lib) of what `lock` pinned for it.

The forged wheel is the BOM's subject (metadata.component: its purl with the file name, its
sha256); every locked distribution is a component with its purl and the sha256 of the file pip
installs, and the subject depends on all of them (the lock is flat). Only the Python
distributions: the base image's OS packages are the base image's own SBOM (scan it with the
pipeline's scanner). Reproducible: the serial number is a UUID5 of the content, the timestamp
SOURCE_DATE_EPOCH or else the forged wheel's own source date epoch."""

from __future__ import annotations

import hashlib
import uuid
from datetime import datetime, timezone
from importlib.metadata import version as dist_version

from cyclonedx.model import HashAlgorithm, HashType
from cyclonedx.model.bom import Bom
from cyclonedx.model.component import Component, ComponentType
from cyclonedx.output.json import JsonV1Dot6
from packageurl import PackageURL

from . import __version__


def _component(name: str, version: str, sha256: str, kind: ComponentType, file_name: str = "") -> Component:
    purl = PackageURL("pypi", name=name, version=version, qualifiers={"file_name": file_name} if file_name else None)
    return Component(name=name, version=version, type=kind, purl=purl, bom_ref=purl.to_string(),
                     hashes=[HashType(alg=HashAlgorithm.SHA_256, content=sha256)])


def sbom_json(wheel_name: str, wheel_sha256: str, locked: list[tuple[str, str, str]], epoch: int) -> str:
    """CycloneDX 1.6 JSON for the forged wheel `wheel_name` and the (name, version, sha256) it is
    installed with."""
    name, version = wheel_name.split("-")[:2]
    root = _component(name, version, wheel_sha256, ComponentType.APPLICATION, wheel_name)
    deps = [_component(n, v, h, ComponentType.LIBRARY) for n, v, h in sorted(locked)]
    key = "\n".join([wheel_name, wheel_sha256, *(f"{n}=={v} {h}" for n, v, h in sorted(locked))])
    bom = Bom(serial_number=uuid.uuid5(uuid.NAMESPACE_URL, "vllm-forge:" + hashlib.sha256(key.encode()).hexdigest()))
    bom.metadata.timestamp = datetime.fromtimestamp(epoch, timezone.utc)
    bom.metadata.component = root
    tools = bom.metadata.tools.components
    tools.add(Component(name="vllm-forge", version=__version__, type=ComponentType.APPLICATION))
    tools.add(Component(name="cyclonedx-python-lib", version=dist_version("cyclonedx-python-lib"),
                        type=ComponentType.LIBRARY))
    for c in deps:
        bom.components.add(c)
    bom.register_dependency(root, deps)
    return JsonV1Dot6(bom).output_as_string(indent=2) + "\n"
