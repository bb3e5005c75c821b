"""`vllm-forge build` and `vllm-forge verify`; on a GPU machine `vllm-forge validate` and `vllm-forge bench`."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from . import __version__
from .errors import ForgeError
from .fetch import end_progress_line
from .output import os_error_line


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that cleanup (temp files) runs."""


def _terminated(signum: int, frame: FrameType | None) -> None:
    raise _Terminated()



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
        raise _gpu_import_error(e) from None

    return validate(ValidateRequest(args.vllm, args.wheel, args.stock_wheel, tuple(args.path), args.out,
                                    args.index_url, args.rounds, args.only, args.record))


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vllm-forge", description=__doc__)
    ap.add_argument("--version", action="version", version=f"vllm-forge {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("build", help="forge a vLLM wheel with FA4 head dim <= 512 + paged KV on SM90")
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
    b.add_argument("--arch", default="9.0a", help="TORCH_CUDA_ARCH_LIST for --mode source (default 9.0a)")
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

    v = sub.add_parser("verify", help="check a forged wheel is what vllm-forge builds from the pinned inputs")
    v.add_argument("wheel", type=Path)
    v.add_argument("--quick", action="store_true",
                   help="no rebuild: pinned-data checks, and RECORD hashes of the members vllm-forge wrote")
    v.add_argument("--base-wheel", type=Path,
                   help="the pinned vLLM base wheel (sha256-checked; default: the download cache build uses)")
    v.add_argument("--no-base", action="store_true",
                   help="do not rebuild: pinned-data checks + self-consistency only")
    v.add_argument("--fa-patches", type=Path, help="flash-attention patch directory the wheel was built with")

    f = sub.add_parser("build-fa4-wheel", help="a reproducible flash-attn-4 wheel of the pinned FA4 (system FA4)")
    f.add_argument("--out", type=Path, default=Path("dist"))
    f.add_argument("--fa-src", help="flash-attention source: a local checkout or a git URL (only that mirror)")
    f.add_argument("--index-url", help="package index simple API (default: pip's)")
    f.add_argument("--fa-patches", type=Path, help="flash-attention patch directory (default: patches/flash-attention)")

    d = sub.add_parser("docker", help="render docker/Dockerfile.in (and build it where an engine works)")
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
    d.add_argument("--isolation", help="buildah/podman --isolation (default: chroot unless BUILDAH_ISOLATION is set)")

    kc = sub.add_parser("fa4-cache", help="compile a model's FA4 kernels ahead of time (GPU machine, forged "
                        "wheel installed): a cache for `vllm-forge docker --fa4-cache`")
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
    lk = sub.add_parser("lock", help="hash-pinned requirements for `pip install --require-hashes` of a wheel")
    lk.add_argument("wheel", type=Path)
    lk.add_argument("--out", type=Path, help="requirements file (default: <wheel>.lock.txt beside it)")
    lk.add_argument("--wheel-ref", help="how the lock names the wheel (default: the path given)")
    lk.add_argument("--python", help="interpreter to resolve for (default: this one)")
    lk.add_argument("--index-url", help="package index simple API (default: pip's)")
    lk.add_argument("--newest", action="store_true",
                    help="take the newest FA4 runtime packages FA4 admits, not the H100-tested set (pins.json)")
    lk.add_argument("--dependencies-out", type=Path, help="also write the lock without the wheel (its own image layer)")
    lk.add_argument("--sbom-out", type=Path, help="also write a CycloneDX JSON SBOM of the wheel and the lock")

    r = sub.add_parser("refresh", help="port the overlay of one pinned vLLM release to another (three-way merge)")
    r.add_argument("--from", dest="from_version", required=True, help="a release the overlay applies to")
    r.add_argument("--to", dest="to_version", required=True, help="the release to port it to (pinned in pins.json)")
    r.add_argument("--data-dir", type=Path, help="where pins.json and vllm_overlay/ are written (default: the tool's)")
    r.add_argument("--force", action="store_true", help="merge even into a release that already carries the fix")
    r.add_argument("--fa-series", action="store_true",
                   help="port the flash-attention patch series of --from's FA pin to --to's FA pin instead")
    r.add_argument("--conflicts", type=Path, help="with --fa-series: leave merged files with conflict markers here")
    r.add_argument("--index-url", help="package index simple API (default: pip's)")

    va = sub.add_parser("validate", help="on a GPU: check the forged FA4 against float64 and time it against the "
                        "release's stock FA4; records the validation for `build`'s gate")
    va.add_argument("--vllm", help="the release the forged vLLM must be (default: whatever is installed / --wheel)")
    va.add_argument("--wheel", type=Path, help="the forged wheel to check (default: the vLLM installed here)")
    va.add_argument("--stock-wheel", type=Path, help="the release's own vLLM wheel (default: the download cache, "
                    "else the index by range requests)")
    va.add_argument("--path", type=Path, action="append", default=[],
                    help="a pip --target directory to import from, first (FA4 runtime, vLLM); repeatable")
    va.add_argument("--out", type=Path, default=Path("."), help="directory for the results JSON (default: .)")
    va.add_argument("--index-url", help="package index simple API (default: pip's)")
    va.add_argument("--rounds", type=int, default=4, help="A/B rounds per case, the order alternating (default 4)")
    va.add_argument("--only", choices=("all", "checks", "ab"), default="all",
                    help="a part only (no record is written): checks, or the A/B timing")
    va.add_argument("--no-record", dest="record", action="store_false",
                    help="do not write the record into the user data directory")
    va.set_defaults(handler=_validate)

    be = sub.add_parser("bench", help="on a GPU: vLLM's engine end to end (Gemma-4-31B shape, random weights), "
                        "stock vs forged, each configuration in its own process")
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
    be.set_defaults(handler=_bench)

    args = ap.parse_args(argv)
    # SIGTERM (a job scheduler, `timeout`, docker stop) unwinds like an interrupt: temp files go
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)
    try:
        if args.cmd in ("validate", "bench"):
            return int(args.handler(args))
        if args.cmd == "build":
            if args.mode == "source":
                from .source import build_source

                print(build_source(args.vllm, args.out, args.index_url, args.arch, args.fa4, args.gemma4_fa4))
                return 0
            from .build import build

            result = build(args.vllm, args.out, args.base_wheel, args.fa_src, args.index_url, args.fa_patches,
                           args.fa4, args.gemma4_fa4, args.allow_unvalidated, args.runtime, args.device_class)
            print(result.wheel)
        elif args.cmd == "build-fa4-wheel":
            from .fa4_wheel import build_fa4_wheel

            print(build_fa4_wheel(args.out, args.fa_src, args.index_url, args.fa_patches).wheel)
        elif args.cmd == "docker":
            from .docker import docker

            print(docker(args.vllm, args.out, args.build, args.context, args.tag, args.engine, args.builder_image,
                         args.runtime_image, args.index_url, args.ca_bundle, args.isolation, args.fa4_cache))
        elif args.cmd == "fa4-cache":
            from .kernel_cache import CacheRequest, produce

            made = produce(CacheRequest(
                args.model, args.out, python=args.python, layers=args.layers,
                tensor_parallel_size=args.tensor_parallel_size, dtype=args.dtype, max_model_len=args.max_model_len,
                max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
                kv_cache_dtype=args.kv_cache_dtype, attention_backend=args.attention_backend,
                gpu_memory_utilization=args.gpu_memory_utilization, trust_remote_code=args.trust_remote_code))
            print(f"{args.out}: {len(made['kernels'])} FA4 kernel(s) for vllm {made['vllm']}")
        elif args.cmd == "lock":
            from .lock import lock

            out = args.out or args.wheel.with_name(args.wheel.name.removesuffix(".whl") + ".lock.txt")
            print(lock(args.wheel, out, args.wheel_ref, args.python, args.index_url, not args.newest,
                       args.dependencies_out, args.sbom_out))
        elif args.cmd == "refresh" and args.fa_series:
            from .refresh_fa import refresh_fa_series

            port = refresh_fa_series(args.from_version, args.to_version, args.data_dir, args.conflicts,
                                     args.index_url)
            print(f"series {port.dir.name}: {len(port.patches)} patch(es) ported cleanly "
                  f"({', '.join(port.files)}); not GPU-validated yet")
        elif args.cmd == "refresh":
            from .refresh import refresh

            rep = refresh(args.from_version, args.to_version, args.data_dir, args.force)
            print(f"overlay {rep.overlay_id}: {len(rep.merged)} file(s) merged ({', '.join(rep.merged) or '-'}), "
                  f"{len(rep.reused)} reused")
        else:
            from .verify import verify_wheel

            if not args.wheel.is_file():
                raise ForgeError(f"{args.wheel} does not exist", "give the path of a forged wheel")
            report = verify_wheel(args.wheel, deep=not args.quick, fa_patch_dir=args.fa_patches,
                                  base_wheel=args.base_wheel, use_base=not args.no_base)
            from .provenance import check_wheel

            report.checks += check_wheel(args.wheel)  # the in-toto statement beside it
            for check in report.checks:
                print(f"ok: {check}")
            level = {"rebuild": " (identical to a rebuild from the pinned inputs)", "": " (quick: no rebuild)"}
            print(f"{report.wheel}: verified{level.get(report.level, f' ({report.level})')}")
    except ForgeError as e:
        end_progress_line()
        print(f"vllm-forge: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # EACCES, ENOSPC, EROFS, EFBIG... anywhere in a command: one line, not a traceback
        end_progress_line()
        print(f"vllm-forge: error: {os_error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        end_progress_line()
        print("vllm-forge: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        end_progress_line()
        print("vllm-forge: terminated", file=sys.stderr)
        return 143
    return 0


if __name__ == "__main__":
    sys.exit(main())
