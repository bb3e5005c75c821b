"""vllm-forge: custom vLLM wheels with FA4 head dim <= 512 and paged KV on SM90.

Commands (each one sub-parser, its arguments and one handler, in COMMANDS below):
  build            forge a vLLM wheel (--mode source: a source tree for vLLM's own CUDA build)
  verify           check a forged wheel is what vllm-forge builds from the pinned inputs (a rebuild)
  build-fa4-wheel  a reproducible flash-attn-4 wheel of the pinned FA4 (system FA4)
  docker           render docker/Dockerfile.in (and build it where an engine works)
  fa4-cache        compile a model's FA4 kernels ahead of time (GPU machine)
  lock             hash-pinned requirements for `pip install --require-hashes` of a wheel
  refresh          port the overlay (the flash-attention series, your own vLLM patches) to another release
  export           your vLLM patch series from an edited unpacked tree (for build --patches)
  pin              resolve a vLLM release vllm-forge does not ship into the user data directory
  validate         on a GPU: the forged FA4 against float64 and timed against the stock FA4 (a record
                   for `build`'s gate)
  bench            on a GPU: vLLM's engine end to end, stock vs forged

One error boundary wraps them all (`run`): a refusal, an argument error, malformed input, resource
exhaustion (MemoryError, EMFILE, ENFILE, ENOMEM) or a filesystem oddity (ELOOP, a device where a file
belongs) ends in ONE line `vllm-forge: error: <what> -- <what to do>` on stderr, exit status 2. Any
other exception is a vllm-forge bug: one line saying so and where its traceback was written (a file
in the temp directory), also exit 2; VLLM_FORGE_DEBUG=1 prints the traceback on stderr instead.
Interrupted: exit 130 (Ctrl-C) or 143 (SIGTERM), temp files removed. Results (paths) go to stdout as
the file system's bytes, whatever stdout's encoding.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from . import __version__
from .errors import ForgeError, refusal, resource_cause
from .fetch import end_progress_line

PROG = "vllm-forge"
BUG_EXIT = 2  # a bug prints the same one-line shape: scripts see "refused", the line says whose fault


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that cleanup (temp files) runs."""


def _terminated(signum: int, frame: FrameType | None) -> None:
    raise _Terminated()


class UsageError(ForgeError):
    """An argument argparse refused: one line and a hint, like every other refusal."""


class _Parser(argparse.ArgumentParser):
    """argparse, but an argument error is a UsageError (one line, exit 2), not usage text + exit."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message, f"see `{self.prog} --help`")


def emit(text: str) -> None:
    """A result line on stdout, as the file system's bytes (a path printed is the path on disk, also
    where stdout's encoding cannot spell it)."""
    sys.stdout.flush()
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is None:  # a text-only stream (an embedding program's): best effort
        print(text.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))
        return
    buffer.write(os.fsencode(text) + b"\n")
    buffer.flush()


def _one_line(text: str) -> str:
    """Control characters (a newline in a path given as an argument) escaped: the line stays one."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


# --- the handlers ------------------------------------------------------------------------------

def _build(args: argparse.Namespace) -> None:
    if args.mode == "source":
        from .source import build_source

        emit(str(build_source(args.vllm, args.out, args.index_url, args.arch, args.fa4, args.gemma4_fa4)))
        return
    from .build import build

    result = build(args.vllm, args.out, args.base_wheel, args.fa_src, args.index_url, args.fa_patches,
                   args.fa4, args.gemma4_fa4, args.allow_unvalidated, args.runtime, args.device_class,
                   platform=args.platform, user_patches=args.patches)
    emit(str(result.wheel))


def _verify(args: argparse.Namespace) -> None:
    from .verify import verify_wheel

    if not args.wheel.is_file():
        raise ForgeError(f"{args.wheel} does not exist", "give the path of a forged wheel")
    report = verify_wheel(args.wheel, deep=not args.quick, fa_patch_dir=args.fa_patches,
                          base_wheel=args.base_wheel, use_base=not args.no_base, platform=args.platform,
                          user_patches=args.patches)
    from .provenance import check_wheel

    report.checks += check_wheel(args.wheel)  # the in-toto statement beside it
    for check in report.checks:
        emit(f"ok: {check}")
    level = {"rebuild": " (identical to a rebuild from the pinned inputs)", "": " (quick: no rebuild)"}
    emit(f"{report.wheel}: verified{level.get(report.level, f' ({report.level})')}")


def _build_fa4_wheel(args: argparse.Namespace) -> None:
    from .fa4_wheel import build_fa4_wheel

    emit(str(build_fa4_wheel(args.out, args.fa_src, args.index_url, args.fa_patches).wheel))


def _docker(args: argparse.Namespace) -> None:
    from .docker import docker

    emit(str(docker(args.vllm, args.out, args.build, args.context, args.tag, args.engine, args.builder_image,
                    args.runtime_image, args.index_url, args.ca_bundle, args.isolation, args.fa4_cache,
                    platform=args.platform)))


def _fa4_cache(args: argparse.Namespace) -> None:
    from .kernel_cache import CacheRequest, produce

    made = produce(CacheRequest(
        args.model, args.out, python=args.python, layers=args.layers,
        tensor_parallel_size=args.tensor_parallel_size, dtype=args.dtype, max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
        kv_cache_dtype=args.kv_cache_dtype, attention_backend=args.attention_backend,
        gpu_memory_utilization=args.gpu_memory_utilization, trust_remote_code=args.trust_remote_code))
    emit(f"{args.out}: {len(made['kernels'])} FA4 kernel(s) for vllm {made['vllm']}")


def _lock(args: argparse.Namespace) -> None:
    from .lock import lock

    out = args.out or args.wheel.with_name(args.wheel.name.removesuffix(".whl") + ".lock.txt")
    emit(str(lock(args.wheel, out, args.wheel_ref, args.python, args.index_url, not args.newest,
                  args.dependencies_out, args.sbom_out, platform=args.platform)))


def _refresh(args: argparse.Namespace) -> None:
    if args.patches is not None:
        from .user_patches import refresh_user_series

        ported = args.out or args.patches.parent / f"{args.patches.name}-{args.to_version}"
        emit(str(refresh_user_series(args.patches, args.from_version, args.to_version, ported, args.index_url,
                                     args.conflicts)))
        return
    if args.fa_series:
        from .refresh_fa import refresh_fa_series

        port = refresh_fa_series(args.from_version, args.to_version, args.data_dir, args.conflicts, args.index_url)
        emit(f"series {port.dir.name}: {len(port.patches)} patch(es) ported cleanly "
             f"({', '.join(port.files)}); not GPU-validated yet")
        return
    from .refresh import refresh

    rep = refresh(args.from_version, args.to_version, args.data_dir, args.force)
    emit(f"overlay {rep.overlay_id}: {len(rep.merged)} file(s) merged ({', '.join(rep.merged) or '-'}), "
         f"{len(rep.reused)} reused")


def _export(args: argparse.Namespace) -> None:
    from .user_patches import export_series

    series_dir, changed = export_series(args.vllm, args.tree, args.out, args.index_url)
    emit(f"{series_dir}: {len(changed)} patch(es) against vLLM {args.vllm} ({', '.join(changed)})")


def _pin(args: argparse.Namespace) -> None:
    from .pin import pin_release
    from .validation import user_data_dir

    res = pin_release(args.version, args.data_dir or user_data_dir(), args.index_url, args.conflicts)
    plats = ", ".join(["x86_64", *res.entry.get("platforms", {})])
    how = (f"overlay {res.entry['overlay']}" if res.entry["plan"] == "backport" else
           f"flash-attention {res.entry['flash_attention_commit'][:7]}, series {res.series}"
           + (f" ported from vLLM {res.ported_from}'s (clean three-way merge, not GPU-validated)"
              if res.ported_from else ""))
    emit(f"pinned vLLM {res.version} ({res.entry['plan']}: {how}; wheels: {plats}) into {res.path}")
    for flag in res.flags:
        emit(f"  note: {flag}")


def _gpu_import_error(e: ImportError) -> ForgeError:
    return ForgeError(f"vllm-forge's own dependencies are incomplete here: {e}",
                      "install vllm-forge with its dependencies (packaging, installer, GitPython; without a git "
                      "executable set GIT_PYTHON_REFRESH=quiet)")


def _validate(args: argparse.Namespace) -> int:
    try:
        from .gpu.validate import ValidateRequest, validate
        from .series import series_hash  # noqa: F401 - GitPython, needed for the record's key
        from .verify import STAMP  # noqa: F401 - installer, needed to read the wheel's stamp
    except ImportError as e:
        if resource_cause(e) is not None:
            raise  # a resource limit behind the import (ulimit -n): the boundary names it
        raise _gpu_import_error(e) from None

    return validate(ValidateRequest(args.vllm, args.wheel, args.stock_wheel, tuple(args.path), args.out,
                                    args.index_url, args.rounds, args.only, args.record, args.pages))


def _bench(args: argparse.Namespace) -> int:
    from .gpu import bench as b

    if args.report:
        print(b.report_paths(args.report), end="")
        return 0
    if args.out is None:
        raise ForgeError("bench needs --out", "give a directory for the results (or --report FILES)")
    configs = tuple(b.parse_config(c) for c in (args.config or b.DEFAULT_CONFIGS))
    paths = {s: p for s, p in (("stock", args.stock_path), ("forged", args.forged_path)) if p is not None}
    return b.bench(b.BenchRequest(
        paths, tuple(args.site), args.out, configs, b.parse_lens(args.prompt_lens), args.prefill_tokens,
        tuple(b.parse_decode(d) for d in (args.decode or ["64x1024x256", "16x32768x256"])), args.layers,
        args.vocab, args.profile, args.hf_reference, args.timeout, args.work, args.python or sys.executable))


# --- the arguments -----------------------------------------------------------------------------

def _platform(p: argparse.ArgumentParser, default: str | None = "x86_64") -> None:
    p.add_argument("--platform", choices=("x86_64", "aarch64"), default=default,
                   help="whose vLLM release wheel: x86_64 or aarch64 (GH200)" +
                   (f" (default {default})" if default else " (default: the wheel's own)"))


def _build_args(b: argparse.ArgumentParser) -> None:
    b.add_argument("--vllm", default=None, help="pinned vLLM version (default: pins.json's default_vllm)")
    b.add_argument("--out", type=Path, default=Path("dist"), help="output directory (default: dist/)")
    b.add_argument("--base-wheel", type=Path, help="use this vLLM wheel instead of the index (sha256-checked)")
    b.add_argument("--fa-src", help="flash-attention source: a local checkout or a git URL (only that mirror)")
    b.add_argument("--index-url", help="package index simple API (default: pip's)")
    b.add_argument("--fa-patches", type=Path, help="flash-attention patch directory (default: patches/flash-attention)")
    b.add_argument("--fa4", choices=("bundled", "system", "both"), default="bundled",
                   help="FA4 in the wheel (bundled), from a separately installed flash-attn-4 (system), "
                        "or bundled with system FA4 selectable (both)")
    b.add_argument("--mode", choices=("overlay", "source"), default="overlay",
                   help="overlay: patch the upstream wheel (default); source: prepare the sdist for vLLM's CUDA build")
    b.add_argument("--arch", default="9.0a",
                   help="TORCH_CUDA_ARCH_LIST for --mode source (default 9.0a; e.g. '8.0;9.0a;10.0a+PTX')")
    b.add_argument("--gemma4-fa4", action=argparse.BooleanOptionalAction, default=None,
                   help="Gemma-4 on SM90 with FA4: FLASH_ATTN + FA4 for every layer where the release forces "
                        "TRITON_ATTN (0.19.0-0.23.0: on by default; --no-gemma4-fa4 keeps the release's choice; "
                        "at run time VLLM_FORGE_GEMMA4_FA4=0 does too)")
    b.add_argument("--allow-unvalidated", action="store_true",
                   help="tune releases: ship a flash-attention series that has no GPU validation record")
    b.add_argument("--no-runtime", dest="runtime", action="store_false",
                   help="leave out the runtime layer (FA4 kernel cache, start-up compile, 64-token pages "
                        "for head > 256 on SM90); the version label gets .nort")
    b.add_argument("--device-class", default="sm90",
                   help="tune releases: the GPUs the wheel is for; a `validate` record of the series on this "
                        "class in the user data directory admits it (default sm90)")
    _platform(b)
    b.add_argument("--patches", type=Path, help="your own vLLM patches: a quilt series + bases.json (vllm-forge "
                   "export), applied after vllm-forge's overlays; the version label gets .u<hash7>")



def _verify_args(v: argparse.ArgumentParser) -> None:
    v.add_argument("wheel", type=Path)
    v.add_argument("--quick", action="store_true",
                   help="no rebuild: pinned-data checks, and RECORD hashes of the members vllm-forge wrote")
    v.add_argument("--base-wheel", type=Path,
                   help="the pinned vLLM base wheel (sha256-checked; default: the download cache build uses)")
    v.add_argument("--no-base", action="store_true",
                   help="do not rebuild: pinned-data checks + self-consistency only")
    v.add_argument("--fa-patches", type=Path, help="flash-attention patch directory the wheel was built with")
    _platform(v, None)
    v.add_argument("--patches", type=Path, help="your vLLM patch series the wheel was built with (default: the "
                   "copy its stamp carries)")


def _build_fa4_wheel_args(f: argparse.ArgumentParser) -> None:
    f.add_argument("--out", type=Path, default=Path("dist"))
    f.add_argument("--fa-src", help="flash-attention source: a local checkout or a git URL (only that mirror)")
    f.add_argument("--index-url", help="package index simple API (default: pip's)")
    f.add_argument("--fa-patches", type=Path, help="flash-attention patch directory (default: patches/flash-attention)")


def _docker_args(d: argparse.ArgumentParser) -> None:
    d.add_argument("--vllm", default=None)
    d.add_argument("--out", type=Path, default=Path("build/docker"))
    d.add_argument("--build", action="store_true",
                   help="build the rendered file (context: --context) with docker, else buildah, else podman")
    d.add_argument("--context", type=Path, default=Path("."), help="build context: a vllm-forge checkout")
    d.add_argument("--tag", help="image tag (default: localhost/vllm-forge/vllm:<forged version>)")
    d.add_argument("--engine", choices=("auto", "docker", "buildah", "podman"), default="auto",
                   help="container engine (default: the first of docker, buildah, podman that answers)")
    d.add_argument("--builder-image", help="builder base image (default: pins.json's CUDA devel image)")
    d.add_argument("--runtime-image", help="runtime base image (default: pins.json's CUDA runtime image)")
    d.add_argument("--index-url", help="package index for the host's forge and the image's pip (default: PyPI)")
    d.add_argument("--ca-bundle", type=Path,
                   help="CA bundle for the build's HTTPS (secret ca-bundle; default: PIP_CERT/SSL_CERT_FILE if set)")
    d.add_argument("--fa4-cache", type=Path,
                   help="an FA4 kernel cache made by `vllm-forge fa4-cache` with this forged wheel: into the image")
    _platform(d)
    d.add_argument("--isolation", help="buildah/podman --isolation (default: chroot unless BUILDAH_ISOLATION is set)")


def _fa4_cache_args(kc: argparse.ArgumentParser) -> None:
    kc.add_argument("--model", required=True, help="HF model id or directory (only its config is read)")
    kc.add_argument("--out", type=Path, required=True, help="cache directory (kept kernels of earlier runs)")
    kc.add_argument("--python", help="interpreter with the forged vLLM installed (default: this one)")
    kc.add_argument("--layers", type=int, help="start the model with its first N layers (each layer type kept)")
    kc.add_argument("--tensor-parallel-size", type=int, default=1)
    kc.add_argument("--dtype", default="auto")
    kc.add_argument("--max-model-len", type=int)
    kc.add_argument("--max-num-batched-tokens", type=int)
    kc.add_argument("--block-size", type=int, help="only if serving sets it too (the kernels depend on it)")
    kc.add_argument("--kv-cache-dtype")
    kc.add_argument("--attention-backend", help="as serving sets it (e.g. FLASH_ATTN: vLLM may pick another)")
    kc.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    kc.add_argument("--trust-remote-code", action="store_true")


def _lock_args(lk: argparse.ArgumentParser) -> None:
    lk.add_argument("wheel", type=Path)
    lk.add_argument("--out", type=Path, help="requirements file (default: <wheel>.lock.txt beside it)")
    lk.add_argument("--wheel-ref", help="how the lock names the wheel (default: the path given; a plain path or URL)")
    lk.add_argument("--python", help="interpreter to resolve for (default: this one)")
    lk.add_argument("--index-url", help="package index simple API (default: pip's)")
    lk.add_argument("--newest", action="store_true",
                    help="take the newest FA4 runtime packages FA4 admits, not the H100-tested set (pins.json)")
    _platform(lk, None)
    lk.add_argument("--dependencies-out", type=Path, help="also write the lock without the wheel (its own image layer)")
    lk.add_argument("--sbom-out", type=Path, help="also write a CycloneDX JSON SBOM of the wheel and the lock")


def _pin_args(pn: argparse.ArgumentParser) -> None:
    pn.add_argument("version", help="the vLLM release, e.g. 0.34.0")
    pn.add_argument("--data-dir", type=Path, help="user data directory (default: $VLLM_FORGE_USER_DATA_DIR, else "
                    "$XDG_DATA_HOME/vllm-forge, else ~/.local/share/vllm-forge; build reads the same)")
    pn.add_argument("--index-url", help="package index simple API (default: pip's)")
    pn.add_argument("--conflicts", type=Path, help="where a conflicting series port leaves the merged files "
                    "with conflict markers (nothing else is written)")


def _export_args(ex: argparse.ArgumentParser) -> None:
    ex.add_argument("--vllm", required=True, help="the release the tree was unpacked from")
    ex.add_argument("--tree", type=Path, required=True, help="the directory holding the edited vllm/ (an unpacked "
                    "wheel or pip --target; files may be missing)")
    ex.add_argument("--out", type=Path, required=True, help="the series directory to write (must not exist)")
    ex.add_argument("--index-url", help="package index simple API (default: pip's)")


def _refresh_args(r: argparse.ArgumentParser) -> None:
    r.add_argument("--from", dest="from_version", required=True, help="a release the overlay applies to")
    r.add_argument("--to", dest="to_version", required=True, help="the release to port it to (pinned in pins.json)")
    r.add_argument("--data-dir", type=Path, help="where pins.json and vllm_overlay/ are written (default: the tool's)")
    r.add_argument("--force", action="store_true", help="merge even into a release that already carries the fix")
    r.add_argument("--fa-series", action="store_true",
                   help="port the flash-attention patch series of --from's FA pin to --to's FA pin instead")
    r.add_argument("--conflicts", type=Path, help="with --fa-series/--patches: leave merged files with conflict "
                   "markers here")
    r.add_argument("--index-url", help="package index simple API (default: pip's)")
    r.add_argument("--patches", type=Path, help="port your own vLLM patch series (made on --from's files) instead")
    r.add_argument("--out", type=Path, help="with --patches: the ported series' directory (default: DIR-<to>)")


def _page_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of page sizes") from None


def _validate_args(va: argparse.ArgumentParser) -> None:
    va.add_argument("--vllm", help="the release the forged vLLM must be (default: whatever is installed / --wheel)")
    va.add_argument("--wheel", type=Path, help="the forged wheel to check (default: the vLLM installed here)")
    va.add_argument("--stock-wheel", type=Path, help="the release's own vLLM wheel (default: the download cache, "
                    "else the index by range requests)")
    va.add_argument("--path", type=Path, action="append", default=[],
                    help="a pip --target directory to import from, first (FA4 runtime, vLLM); repeatable")
    va.add_argument("--out", type=Path, default=Path("."), help="directory for the results JSON (default: .)")
    va.add_argument("--index-url", help="package index simple API (default: pip's)")
    va.add_argument("--rounds", type=int, default=4, help="A/B rounds per case, the order alternating (default 4)")
    va.add_argument("--pages", type=_page_list, default=(16, 64),
                    help="A/B page sizes, comma-separated, of 16,32,64,128 (default 16,64)")
    va.add_argument("--only", choices=("all", "checks", "ab"), default="all",
                    help="a part only (no record is written): checks, or the A/B timing")
    va.add_argument("--no-record", dest="record", action="store_false",
                    help="do not write the record into the user data directory")


def _bench_args(be: argparse.ArgumentParser) -> None:
    be.add_argument("--stock-path", type=Path, help="directory with the stock vLLM (pip install --no-deps --target)")
    be.add_argument("--forged-path", type=Path, help="directory with the forged vLLM (pip install --no-deps --target)")
    be.add_argument("--site", type=Path, action="append", default=[],
                    help="a directory of further packages (FA4 runtime, vLLM's dependencies), after the side's; "
                         "repeatable")
    be.add_argument("--out", type=Path, help="results directory: bench_<config>.json, logs, bench.md")
    be.add_argument("--config", action="append",
                    help="NAME=stock|forged[:vLLM ENGINE ARGS and VAR=VALUE], repeatable (default: "
                         "stock and forged, both --attention-backend FLASH_ATTN)")
    be.add_argument("--prompt-lens", default="8192,32768", help="prompt lengths for prefill tok/s and TTFT")
    be.add_argument("--prefill-tokens", type=int, default=262144,
                    help="tokens per prefill measurement (prompts = this / length, at least 1)")
    be.add_argument("--decode", action="append", help="SEQSxCONTEXTxOUT, repeatable (default: 64x1024x256 and "
                    "16x32768x256); greedy agreement is read on the first")
    be.add_argument("--layers", type=int, default=6, help="model layers (the 5:1 sliding:global pattern kept)")
    be.add_argument("--vocab", type=int, default=16384)
    be.add_argument("--no-profile", dest="profile", action="store_false", help="skip the torch profiler step")
    be.add_argument("--no-hf-reference", dest="hf_reference", action="store_false",
                    help="skip transformers' own first tokens on the checkpoint")
    be.add_argument("--timeout", type=int, default=1800, help="seconds per configuration (default 1800)")
    be.add_argument("--work", type=Path, help="checkpoint and caches (default: OUT/work)")
    be.add_argument("--python", help="interpreter for the configurations (default: this one)")
    be.add_argument("--report", type=Path, nargs="+", help="only print the tables of saved results (files or dirs)")


# a handler returns None (success) or its own exit status (validate, bench: 0 passed, 1 failed)
Handler = Callable[[argparse.Namespace], "int | None"]

# name, help, arguments, handler: the command line
COMMANDS: list[tuple[str, str, Callable[[argparse.ArgumentParser], None], Handler]] = [
    ("build", "forge a vLLM wheel with FA4 head dim <= 512 + paged KV on SM90", _build_args, _build),
    ("verify", "check a forged wheel is what vllm-forge builds from the pinned inputs", _verify_args, _verify),
    ("build-fa4-wheel", "a reproducible flash-attn-4 wheel of the pinned FA4 (system FA4)", _build_fa4_wheel_args,
     _build_fa4_wheel),
    ("docker", "render docker/Dockerfile.in (and build it where an engine works)", _docker_args, _docker),
    ("fa4-cache", ("compile a model's FA4 kernels ahead of time (GPU machine, forged wheel installed): a cache "
                   "for `vllm-forge docker --fa4-cache`"), _fa4_cache_args, _fa4_cache),
    ("lock", "hash-pinned requirements for `pip install --require-hashes` of a wheel", _lock_args, _lock),
    ("refresh", "port the overlay of one pinned vLLM release to another (three-way merge)", _refresh_args, _refresh),
    ("pin", ("resolve a vLLM release vllm-forge does not ship (wheels, sdist, FA pin, plan, FA series ported "
             "from the nearest pin) into the user data directory"), _pin_args, _pin),
    ("export", "your vLLM patch series from an edited unpacked tree (for build --patches)", _export_args, _export),
    ("validate", ("on a GPU: check the forged FA4 against float64 and time it against the release's stock FA4; "
                  "records the validation for `build`'s gate"), _validate_args, _validate),
    ("bench", ("on a GPU: vLLM's engine end to end (Gemma-4-31B shape, random weights), stock vs forged, each "
               "configuration in its own process"), _bench_args, _bench),
]


def parser() -> argparse.ArgumentParser:
    ap = _Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for name, help_text, add_arguments, handler in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(handler=handler)
    return ap


# --- the boundary ------------------------------------------------------------------------------

def _error(what: str) -> int:
    end_progress_line()
    print(f"{PROG}: error: {_one_line(what)}", file=sys.stderr, flush=True)
    return 2


def _bug(e: BaseException) -> int:
    """An exception no refusal covers: a vllm-forge bug. One line; the traceback in a file."""
    text = "".join(traceback.format_exception(e))
    if os.environ.get("VLLM_FORGE_DEBUG") == "1":
        end_progress_line()
        print(text, file=sys.stderr, end="", flush=True)
        where = "the traceback is above"
    else:
        try:
            fd, path = tempfile.mkstemp(prefix="vllm-forge-bug-", suffix=".txt")
            with os.fdopen(fd, "w", errors="backslashreplace") as f:
                f.write(f"{PROG} {__version__}, argv {sys.argv!r}\n{text}")
            where = f"the traceback is in {path}"
        except Exception as werr:  # noqa: BLE001  # a full temp directory must not hide the bug line
            where = f"the traceback could not be written ({type(werr).__name__}: {werr})"
    summary = f"{type(e).__name__}: {e}"[:300]
    return _error(f"internal error ({summary}): a vllm-forge bug -- {where}; please report it with the command "
                  "line (VLLM_FORGE_DEBUG=1 prints the traceback)")


def run(handler: Handler, args: argparse.Namespace) -> int:
    """The one error boundary: the handler's refusals and everything else that escapes it."""
    try:
        status = handler(args)
    except KeyboardInterrupt:
        end_progress_line()
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        end_progress_line()
        print(f"{PROG}: terminated", file=sys.stderr)
        return 143
    except Exception as e:  # noqa: BLE001  # the boundary: every exception becomes one line (a bug's too)
        refused = refusal(e)
        if refused is None:
            return _bug(e)
        if os.environ.get("VLLM_FORGE_DEBUG") == "1" and not isinstance(e, UsageError):
            traceback.print_exception(e, file=sys.stderr)
        return _error(str(refused))
    return int(status or 0)


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # a message never fails on an encoding (LANG=C, PYTHONIOENCODING)
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            with contextlib.suppress(ValueError, OSError):
                reconfigure(errors="backslashreplace")
    try:
        args = parser().parse_args(argv)
    except UsageError as e:
        return _error(str(e))
    # SIGTERM (a job scheduler, `timeout`, docker stop) unwinds like an interrupt: temp files go
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)
    return run(args.handler, args)


if __name__ == "__main__":
    sys.exit(main())
