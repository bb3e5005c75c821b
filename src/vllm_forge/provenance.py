"""Provenance of a forged wheel: an in-toto Statement v1 whose predicate is SLSA Provenance v1,
written beside the wheel by `build` (`<wheel stem>.intoto.json`) and checked by `verify`.

The statement is unsigned: a release pipeline signs it with its own identity, e.g.
`cosign attest-blob --type slsaprovenance1 --predicate <(jq .predicate F.intoto.json) WHEEL` or, for
the image, `cosign attest --type slsaprovenance1 ...`; `cosign verify-attestation` / `slsa-verifier`
then check the signed envelope. What is checked here is the content: the subject is the wheel's
sha256, and every resolved dependency (the base wheel's sha256, the flash-attention pin and tree
hashes, the patch series, the overlay patches and files, the runtime layer, the tool) is what the
wheel's own stamp and pins.json say.

A small typed writer rather than the `in-toto-attestation` package: the statement is four fields
of JSON (https://github.com/in-toto/attestation/blob/main/spec/v1/statement.md) and the predicate a
documented JSON shape (https://slsa.dev/spec/v1.0/provenance); the package's bindings are protobuf
classes (a protobuf runtime for one JSON file, last released 2023) and verify needs only field
comparisons. The output is deterministic: the same inputs give the same bytes (no times in it)."""

from __future__ import annotations

import json
import sys
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .errors import ForgeError
from .pins import Pins
from .series import series_hash, series_sha256

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "urn:vllm-forge:build:v1"  # `vllm-forge build`: externalParameters below, nothing else
BUILDER_ID = "urn:vllm-forge:builder"
SUFFIX = ".intoto.json"


def statement_path(wheel: Path) -> Path:
    return wheel.with_name(wheel.name.removesuffix(".whl") + SUFFIX)


@dataclass(frozen=True)
class ResourceDescriptor:
    """in-toto ResourceDescriptor (spec v1): name, uri, digest (algorithm -> hex), annotations."""
    name: str
    uri: str = ""
    digest: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v}


def purl_pypi(name: str, version: str, file_name: str = "") -> str:
    """A package URL (purl) of a PyPI distribution; file_name is purl's `file_name` qualifier."""
    purl = f"pkg:pypi/{name}@{quote(version, safe='')}"
    return purl + (f"?file_name={quote(file_name, safe='')}" if file_name else "")


def resolved_dependencies(stamp: dict[str, Any], fa_repository: str) -> list[ResourceDescriptor]:
    """The inputs of a forge, from the wheel's stamp (dist-info/vllm_forge.json)."""
    v = stamp["vllm"]
    fa = stamp["flash_attention"]
    deps = [
        ResourceDescriptor(v["wheel"], purl_pypi("vllm", v["version"], v["wheel"]), {"sha256": v["wheel_sha256"]}),
        ResourceDescriptor("flash-attention", f"git+{fa_repository}@{fa['commit']}", {"gitCommit": fa["commit"]},
                           {"cute_tree_sha256": fa["pin_tree_sha256"], "forged_cute_tree_sha256": fa["tree_sha256"]}),
    ]
    if fa["patches"]:
        shas = [p["sha256"] for p in fa["patches"]]
        deps.append(ResourceDescriptor("flash-attention patch series", digest={"sha256": series_sha256(shas)},
                                       annotations={"patches": str(len(shas)), "version_label": series_hash(shas)}))
        deps += [ResourceDescriptor(f"flash-attention patch {p['name']}", digest={"sha256": p["sha256"]})
                 for p in fa["patches"]]
    for path, steps in sorted(stamp["overlay"]["files"].items()):
        deps += [ResourceDescriptor(f"overlay {s['overlay']} patch {s['patch']}", digest={"sha256": s["patch_sha256"]},
                                    annotations={"path": path, "base_sha256": s["base_sha256"]}) for s in steps]
    deps += [ResourceDescriptor(f"overlay file {path}", digest={"sha256": sha})
             for path, sha in sorted(stamp["overlay"]["adds"].items())]
    rt = stamp.get("runtime")
    if rt:
        deps.append(ResourceDescriptor(f"runtime layer {rt['file']}",
                                       digest={"sha256": rt["sha256"]}))
    tool = stamp["tool"].removeprefix("vllm-forge ")
    deps.append(ResourceDescriptor("vllm-forge", purl_pypi("vllm-forge", tool)))
    return deps


def statement(wheel_name: str, wheel_sha256: str, stamp: dict[str, Any], fa_repository: str) -> dict[str, Any]:
    """The in-toto Statement v1 (SLSA Provenance v1 predicate) of a forged wheel."""
    layers = stamp["overlay"]["layers"]
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": wheel_name, "digest": {"sha256": wheel_sha256}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {
                    "vllm": stamp["vllm"]["version"], "plan": stamp["plan"], "fa4": stamp["fa4_mode"],
                    "overlay": layers, "runtime": bool(stamp.get("runtime")),
                },
                "internalParameters": {"source_date_epoch": stamp["source_date_epoch"]},
                "resolvedDependencies": [d.to_json() for d in resolved_dependencies(stamp, fa_repository)],
            },
            "runDetails": {
                "builder": {"id": BUILDER_ID, "version": {"vllm-forge": stamp["tool"].removeprefix("vllm-forge ")}},
            },
        },
    }


def render(st: dict[str, Any]) -> bytes:
    return (json.dumps(st, indent=2, sort_keys=True) + "\n").encode()


def _fail(wheel: Path, what: str) -> ForgeError:
    return ForgeError(f"verify {wheel.name}: provenance {statement_path(wheel).name}: {what}",
                      "do not ship this wheel; rebuild it with vllm-forge build (it writes the statement beside it)")


def _descriptors(st: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d.get("name", ""): d for d in st.get("predicate", {}).get("buildDefinition", {})
            .get("resolvedDependencies", []) if isinstance(d, dict)}


def check_statement(wheel: Path, wheel_sha256: str, stamp: dict[str, Any], pins: Pins,
                    path: Path | None = None) -> list[str]:
    """Check the statement beside `wheel` against the wheel (subject = its sha256) and its stamp and
    pins.json (materials). Returns what was checked; raises ForgeError at the first difference."""
    path = path or statement_path(wheel)
    try:
        st = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise _fail(wheel, "missing") from None
    except (OSError, ValueError) as e:
        raise _fail(wheel, f"unreadable ({e})") from None
    if not isinstance(st, dict) or st.get("_type") != STATEMENT_TYPE or st.get("predicateType") != PREDICATE_TYPE:
        raise _fail(wheel, f"not an in-toto Statement v1 with predicate {PREDICATE_TYPE}")
    try:
        return _check_fields(wheel, wheel_sha256, stamp, pins, st, path)
    except (AttributeError, TypeError, KeyError, IndexError):  # a field of the wrong JSON type
        raise _fail(wheel, "malformed (a field has the wrong type)") from None


def _check_fields(wheel: Path, wheel_sha256: str, stamp: dict[str, Any], pins: Pins, st: dict[str, Any],
                  path: Path) -> list[str]:
    subjects = st.get("subject") or [{}]
    got = subjects[0].get("digest", {}).get("sha256") if len(subjects) == 1 else None
    if got != wheel_sha256 or subjects[0].get("name") != wheel.name:
        raise _fail(wheel, f"subject {subjects[0].get('name')} sha256 {str(got)[:12]} is not this wheel "
                           f"({wheel_sha256[:12]})")
    vpin = pins.for_version(stamp["vllm"]["version"], platform=str(stamp["vllm"].get("platform", "x86_64")))
    deps = _descriptors(st)
    base = deps.get(vpin.wheel, {}).get("digest", {}).get("sha256")
    if base != vpin.wheel_sha256:
        raise _fail(wheel, f"base wheel {vpin.wheel} sha256 {str(base)[:12]} "
                           f"is not the pinned {vpin.wheel_sha256[:12]}")
    fa = deps.get("flash-attention", {})
    commit, tree = fa.get("digest", {}).get("gitCommit"), fa.get("annotations", {}).get("cute_tree_sha256")
    want_commit = pins.fa_commit(vpin)
    want_tree = pins.fa.cute_tree_sha256 if vpin.plan == "backport" else vpin.cute_tree_sha256
    if commit != want_commit or tree != want_tree:
        raise _fail(wheel, f"flash-attention {str(commit)[:12]} tree {str(tree)[:12]} is not the pin "
                           f"{want_commit[:12]} tree {want_tree[:12]}")
    want = statement(wheel.name, wheel_sha256, stamp, pins.fa.git_repository)
    if st != want:  # series, patches, overlay, runtime layer, tool: as the wheel's stamp records them
        mine, theirs = _descriptors(want), deps
        diff = sorted(n for n in set(mine) | set(theirs) if mine.get(n) != theirs.get(n))
        raise _fail(wheel, "differs from the wheel's stamp" +
                    (f" in {', '.join(diff[:3])}" if diff else " (parameters or builder)"))
    n = len(deps)
    return [f"provenance {path.name}: subject sha256 {wheel_sha256[:12]} = the wheel; base wheel, "
            f"flash-attention {want_commit[:7]} (tree {want_tree[:12]}) = pins; {n} materials = the stamp"]


def check_wheel(wheel: Path, pins: Pins | None = None) -> list[str]:
    """`verify`'s provenance check: the statement beside `wheel` against the wheel itself. A wheel
    with no statement beside it (copied alone) is said so on stderr and not checked; a statement
    that does not match is an error."""
    from .docker import wheel_stamp
    from .fetch import sha256_file
    from .pins import load_pins

    if not statement_path(wheel).exists():
        print(f"vllm-forge: warning: no provenance statement {statement_path(wheel).name} beside the wheel: "
              "not checked (build writes it; ship it with the wheel)", file=sys.stderr)
        return []
    try:
        stamp = json.loads(wheel_stamp(wheel))
    except (StopIteration, KeyError, ValueError, OSError, zipfile.BadZipFile) as e:
        raise _fail(wheel, f"cannot read the wheel's stamp ({type(e).__name__})") from None
    return check_statement(wheel, sha256_file(wheel), stamp, pins or load_pins())
