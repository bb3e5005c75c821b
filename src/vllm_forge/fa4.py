"""Stage 2b, FA4 sources: the pinned flash-attention `flash_attn/cute`, from the first mirror
that works, rewritten by the CMake FA4 component, tree-hash checked, then patched.

Mirrors, in order: an explicit --fa-src (path or git URL) alone; otherwise
VLLM_FLASH_ATTN_SRC_DIR, the verified cache, git (the primary mirror), the vLLM wheel
that ships the same pin (read with HTTP range requests: only the cute members).
"""

from __future__ import annotations

import configparser
import hashlib
import http.client
import os
import re
import shutil
import socket
import subprocess
import sys
import urllib.error
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import git

from .assemble import open_zip
from .errors import ForgeError, resource_refusal
from .fetch import (
    Index,
    cache_dir,
    clear_cache_slot,
    evict,
    pinned_wheel_source,
    safe_member_name,
)
from .patching import AppliedPatch, apply_series, check_series
from .pins import FaPin, Pins, VllmPin, WheelMirror, data_dir, version_label
from .series import series_for

UPSTREAM_PKG = "flash_attn.cute"
VLLM_PKG = "vllm.vllm_flash_attn.cute"
CUTE = "flash_attn/cute"
WHEEL_CUTE = "vllm/vllm_flash_attn/cute"
FA4_COMPONENT = "_vllm_fa4_cutedsl_C"

Tree = dict[str, bytes]  # path relative to the cute directory -> content


def tree_sha256(tree: Tree) -> str:
    """sha256 over `sha256sum`-style lines of the .py files, sorted by path."""
    lines = "".join(f"{hashlib.sha256(tree[p]).hexdigest()}  {p}\n" for p in sorted(tree))
    return hashlib.sha256(lines.encode()).hexdigest()


@dataclass(frozen=True)
class FaTarget:
    """The flash-attention FA4 tree a forged wheel carries, and where it can be had."""

    commit: str
    cute_tree_sha256: str          # as vLLM's CMake rewrites it (tree_sha256)
    git_repository: str
    wheel: WheelMirror             # a vLLM wheel that ships exactly this tree
    local_wheel: Path | None = None  # that wheel, already here and sha256-checked (the tune base)

    @property
    def short(self) -> str:
        return self.commit[:7]


def as_target(pin: FaPin | FaTarget) -> FaTarget:
    """pins.json's backport FA pin as a target (its mirror: the vLLM wheel that ships it)."""
    if isinstance(pin, FaTarget):
        return pin
    return FaTarget(pin.commit, pin.cute_tree_sha256, pin.git_repository, pin.wheel_mirror)


def fa_target(pins: Pins, vpin: VllmPin, local_wheel: Path | None = None) -> FaTarget:
    """backport: pins.json's FA pin (mirror: the vLLM wheel that ships it); tune: the release's own
    pin, whose first mirror is the release wheel itself."""
    if vpin.plan == "backport":
        return as_target(pins.fa)
    mirror = WheelMirror(vpin.version, vpin.wheel, vpin.wheel_sha256, WHEEL_CUTE + "/")
    return FaTarget(vpin.flash_attention_commit, vpin.cute_tree_sha256, pins.fa.git_repository, mirror, local_wheel)


def forged_label(pins: Pins, vpin: VllmPin, fa4_mode: str = "bundled", gemma4_fa4: bool | None = None) -> str:
    """The version label `build` gives vpin with its pin's default series (and default Gemma-4 layer)."""
    from .overlay import gemma4_fa4_for

    target = fa_target(pins, vpin)
    series = series_for(target.cute_tree_sha256)
    return version_label(target.short, fa4_mode, gemma4_fa4_for(vpin.version, gemma4_fa4),
                         series.hash if series else "")


def default_patch_dir(target: FaTarget) -> Path | None:
    """The series of that pin (patches/flash-attention/manifest.json), None if it has none."""
    found = series_for(target.cute_tree_sha256)
    return found.dir if found else None


@dataclass
class Fa4Sources:
    files: Tree                 # rewritten (vllm.vllm_flash_attn.cute) and patched
    upstream: Tree              # patched, upstream imports (flash_attn.cute)
    mirror: str
    pin_tree_sha256: str        # verified against pins.json
    tree_sha256: str            # after patches; equals pin_tree_sha256 without patches
    patches: list[AppliedPatch] = field(default_factory=list)


def zip_tree(zf: zipfile.ZipFile, prefix: str) -> Tree:
    """The files of an archive under `prefix` (e.g. the wheel's cute directory), relative to it."""
    return {n[len(prefix) + 1:]: zf.read(n) for n in zf.namelist()
            if n.startswith(prefix + "/") and not n.endswith("/")}


def read_tree(root: Path, origin: str) -> Tree:
    """The *.py files under root (a cute directory), refusing links that leave it."""
    if not (root / "interface.py").is_file():
        raise ForgeError(f"{origin} has no {CUTE}/interface.py", "point it at a flash-attention checkout")
    tree: Tree = {}
    try:
        real_root = root.resolve(strict=True)
        for p in sorted(root.rglob("*.py")):
            if not p.resolve(strict=True).is_relative_to(real_root):
                raise ForgeError(f"{p} in {origin} links outside {root}", "refusing to read it")
            if not p.is_file():  # a FIFO would block the read forever; a directory named *.py
                raise ForgeError(f"{p} in {origin} is not a regular file", "replace it with the file")
            rel = p.relative_to(root).as_posix()
            tree[str(safe_member_name(rel, origin))] = p.read_bytes()
    except (RuntimeError, OSError) as e:  # a symlink loop (RuntimeError before Python 3.13), a dangling link
        refused = resource_refusal(e)
        if refused is not None:
            raise refused from None
        raise ForgeError(f"cannot read {origin}: {e}",
                         "a link in that tree loops or dangles; replace it with the file") from None
    return tree


def write_tree(tree: Tree, root: Path) -> None:
    for rel, data in tree.items():
        dst = root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(data)


# --- mirrors: each returns the upstream-form tree (flash_attn.cute imports) -------------

def from_local(path: Path) -> Tree:
    if not path.is_dir():
        raise ForgeError(f"flash-attention source directory {path} does not exist", "check --fa-src")
    return read_tree(path / CUTE, f"local checkout {path}")


def _git_mirror(url: str) -> git.Repo:
    """A bare, blobless (partial-clone) repository in the cache for one mirror URL."""
    repo_dir = cache_dir() / "git" / (hashlib.sha256(url.encode()).hexdigest()[:16] + ".git")
    clear_cache_slot(repo_dir.parent, is_dir=True)  # cache/git itself a file
    if repo_dir.exists() or repo_dir.is_symlink():
        why = _broken_mirror(repo_dir, url)
        if not why:
            return git.Repo(str(repo_dir))
        evict(repo_dir, why, "cloning it again", f"git mirror {url}")
    repo_dir.parent.mkdir(parents=True, exist_ok=True)
    # `git init --bare <dir>` run in the cache: never in the current directory
    git.Git(str(repo_dir.parent)).execute(["git", "init", "--quiet", "--bare", str(repo_dir)])
    repo = git.Repo(str(repo_dir))
    with repo.config_writer() as cw:
        cw.set_value('remote "origin"', "url", url)
        cw.set_value('remote "origin"', "promisor", "true")
        cw.set_value('remote "origin"', "partialclonefilter", "blob:none")
        # local mirrors serve partial clones and single commits only when told to
        cw.set_value('remote "origin"', "uploadpack",
                     "git -c uploadpack.allowFilter=true -c uploadpack.allowAnySHA1InWant=true upload-pack")
    return repo


def _broken_mirror(repo_dir: Path, url: str) -> str:
    """Why a cached git mirror cannot serve ("" when it can): a file, a link, an empty or foreign
    directory where the bare repository of `url` belongs."""
    if repo_dir.is_symlink() or not repo_dir.is_dir():
        return "is not a directory"
    if not (repo_dir / "HEAD").is_file() or not (repo_dir / "objects").is_dir():
        return "is not a bare git repository"
    try:
        repo = git.Repo(str(repo_dir))
        if not repo.bare or repo.config_reader().get_value('remote "origin"', "url", "") != url:
            return "is not the bare mirror of that URL"
    except (git.GitError, OSError, ValueError, configparser.Error) as e:  # a damaged repository
        return f"is unreadable ({type(e).__name__})"
    return ""


def from_git(url: str, commit: str) -> Tree:
    """The pinned commit's flash_attn/cute from a git mirror: a shallow, blobless fetch of that
    commit; only the blobs of flash_attn/cute are then fetched (lazily, by git)."""
    repo = _git_mirror(url)
    try:
        commit_obj = repo.commit(commit)
    except (ValueError, git.BadName):
        print(f"  git: fetching {commit[:12]} from {url}", file=sys.stderr, flush=True)
        errors: dict[str, str] = {}
        for what, args in (("commit", ["--depth=1", commit]), ("branches", ["+refs/heads/*:refs/remotes/origin/*"])):
            try:
                repo.git.fetch("--filter=blob:none", "--no-tags", "origin", *args)
            except git.GitCommandError as e:
                errors[what] = _git_error(e)
            try:
                commit_obj = repo.commit(commit)
                break
            except (ValueError, git.BadName):
                continue
        else:
            if "branches" in errors:  # a reachable repository always answers a fetch of its branches
                raise ForgeError(f"cannot reach git mirror {url}: {errors['branches']}",
                                 "check the network or the URL (the mirror is unreachable, not missing the commit)")
            raise ForgeError(f"commit {commit} not found in git mirror {url}",
                             "the mirror answered but lacks that commit; check the URL and the pin")
    try:
        sub = commit_obj.tree / CUTE
    except KeyError:
        raise ForgeError(f"commit {commit} of {url} has no {CUTE}", "not a flash-attention repository") from None
    tree: Tree = {}
    try:
        for item in sub.traverse():
            if isinstance(item, git.Blob) and str(item.path).endswith(".py"):
                rel = str(item.path)[len(CUTE) + 1:]
                tree[str(safe_member_name(rel, f"{url}@{commit[:12]}"))] = item.data_stream.read()
    except (git.GitCommandError, ValueError) as e:
        raise ForgeError(f"cannot read {CUTE} of {commit[:12]} from git mirror {url}: {e}",
                         "check the network; the blobs are fetched on demand") from None
    return tree


def _git_error(e: git.GitCommandError) -> str:
    """The telling line of a failed git command (its last `fatal:` line, else its last line)."""
    lines = [ln.strip() for ln in str(e.stderr or "").splitlines() if ln.strip()]
    fatal = [ln for ln in lines if ln.startswith(("fatal:", "error:"))]
    return (fatal or lines or [str(e)])[-1].removeprefix("stderr: ").strip("'")


def from_wheel(pin: FaPin | FaTarget, index: Callable[[], Index], project: str) -> tuple[Tree, str]:
    """The cute files of the vLLM wheel that ships the pin, un-rewritten to upstream form."""
    target = as_target(pin)
    wm, local = target.wheel, target.local_wheel
    fetched = ""
    if local is not None:
        zf = open_zip(local, f"base wheel {local}")  # its sha256 is checked by the build
    else:
        source, how = pinned_wheel_source(index, project, wm.wheel, wm.wheel_sha256,
                                          then="fetching its FA4 files from the index")
        if isinstance(source, Path):
            zf = open_zip(source, f"cached wheel {source}" if how == "cache" else f"wheel {wm.wheel}")
        else:
            remote = source
            zf = open_zip(remote, f"{wm.wheel} (by range requests from the index)",  # type: ignore[arg-type]
                          "the index serves a damaged file; check --index-url")
            remote.prefetch_members(zf, [i for i in zf.infolist() if i.filename.startswith(wm.cute_dir)])
            fetched = f", {remote.fetched / 1e6:.1f} MB fetched by range requests"
    tree: Tree = {}
    with zf:
        for info in zf.infolist():
            if info.filename.startswith(wm.cute_dir) and info.filename.endswith(".py"):
                rel = str(safe_member_name(info.filename[len(wm.cute_dir):], wm.wheel))
                rewritten = zf.read(info)
                upstream = rewritten.replace(VLLM_PKG.encode(), UPSTREAM_PKG.encode())
                if upstream.replace(UPSTREAM_PKG.encode(), VLLM_PKG.encode()) != rewritten:
                    raise ForgeError(f"{info.filename} in {wm.wheel} cannot be mapped back to upstream form",
                                     "use a git or local flash-attention mirror")
                tree[rel] = upstream
    return tree, f"wheel {wm.wheel}{fetched}"


# --- the CMake FA4 component ------------------------------------------------------------

def cmake_exe() -> str:
    """The cmake of the `cmake` package (a dependency: >= 3.26), else the one on PATH."""
    try:
        from cmake import CMAKE_BIN_DIR  # type: ignore[import-untyped]
        found = shutil.which("cmake", path=CMAKE_BIN_DIR)
    except ImportError:
        found = None
    found = found or shutil.which("cmake")
    if found is None:
        raise ForgeError("cmake not found", "pip install cmake (a dependency of vllm-forge)")
    return found


def generator_args() -> list[str]:
    """Ninja (the `ninja` package, a dependency, else one on PATH) as CMake's generator: configuring
    needs a build program even though only an install component runs, and minimal systems (a
    container's builder stage) have no make. Without ninja, CMake's default generator."""
    try:
        from ninja import BIN_DIR  # type: ignore[import-untyped]
        found = shutil.which("ninja", path=BIN_DIR)
    except ImportError:
        found = None
    found = found or shutil.which("ninja")
    return ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={found}"] if found else []


def cmake_install_fa4(src_root: Path, work: Path, commit: str | None = None) -> Tree:
    """Run the project's CMake FA4 component on a flash-attention tree; return the result."""
    build, prefix = work / "cmake-build", work / "cmake-install"
    shutil.rmtree(build, ignore_errors=True)
    shutil.rmtree(prefix, ignore_errors=True)
    env = {**os.environ, "VLLM_FLASH_ATTN_SRC_DIR": str(src_root)}
    cmake = cmake_exe()
    for cmd in (
        [cmake, "-S", str(data_dir()), "-B", str(build), *generator_args(), "-DVLLM_FORGE_FA4=ON",
         *([f"-DVLLM_FORGE_FA_COMMIT={commit}"] if commit else [])],
        [cmake, "--install", str(build), "--component", FA4_COMPONENT, "--prefix", str(prefix)],
    ):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
            raise ForgeError(f"CMake FA4 component failed: {' | '.join(tail)}", f"command: {' '.join(cmd)}")
    return read_tree(prefix / WHEEL_CUTE, "CMake FA4 component output")


_GIT_URL = re.compile(r"^(?:(?:https?|ssh|git|file)://\S+|[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:\S+|[^:\-][^:]*)$")


def check_git_url(url: str) -> str:
    """A git mirror URL of a plain transport (https, http, ssh, git, file, user@host:path, a path): never
    `ext::` (runs a command), an option (`-...`) or a control character."""
    if url.startswith("-") or not _GIT_URL.match(url) or any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise ForgeError(f"--fa-src {url[:80]!r} is neither a directory nor a plain git URL",
                         "give a flash-attention checkout, or an https://, ssh://, git://, file:// or "
                         "user@host:path URL")
    return url


def _mirrors(fa_src: str | None, pin: FaTarget, index: Callable[[], Index],
             project: str) -> list[tuple[str, Callable[[], tuple[Tree, str]]]]:
    if fa_src:
        if "://" in fa_src or fa_src.startswith("git@") or fa_src.endswith(".git") or "::" in fa_src:
            check_git_url(fa_src)
            return [("git", lambda: (from_git(fa_src, pin.commit), f"git {fa_src}@{pin.commit}"))]
        return [("local", lambda: (from_local(Path(fa_src)), f"local {fa_src}"))]
    chain: list[tuple[str, Callable[[], tuple[Tree, str]]]] = []
    env_dir = os.environ.get("VLLM_FLASH_ATTN_SRC_DIR")
    if env_dir:
        chain.append(("VLLM_FLASH_ATTN_SRC_DIR", lambda: (from_local(Path(env_dir)), f"local {env_dir}")))
    if pin.local_wheel is not None:
        chain.append(("base wheel", lambda: from_wheel(pin, index, project)))
    cached = cache_dir() / "fa4" / pin.commit
    chain.append(("cache", lambda: (from_local(cached), f"cache {cached}")))
    chain.append(("git", lambda: (from_git(pin.git_repository, pin.commit),
                                  f"git {pin.git_repository}@{pin.commit}")))
    if pin.local_wheel is None:
        chain.append(("wheel", lambda: from_wheel(pin, index, project)))
    return chain


def no_series(work: Path) -> Path:
    """An empty patch series under work: as get_fa4_sources' patch_dir, the pin as it is
    (patch_dir=None applies the pin's own series)."""
    d = work / "no-series"
    d.mkdir(parents=True, exist_ok=True)
    return d


def get_fa4_sources(pin: FaPin | FaTarget, work: Path, index: Callable[[], Index], project: str,
                    fa_src: str | None = None, patch_dir: Path | None = None) -> Fa4Sources:
    """The pinned FA4 tree, verified, with the patch series applied: patch_dir, else the pin's
    own series from patches/flash-attention/manifest.json (none: the pin as it is)."""
    pin = as_target(pin)
    if patch_dir is not None and not patch_dir.is_dir():
        raise ForgeError(f"flash-attention patch directory {patch_dir} does not exist",
                         "check --fa-patches (a directory with *.patch files and an optional series)")
    series_dir = patch_dir if patch_dir is not None else default_patch_dir(pin)
    if series_dir is not None and series_dir.is_dir():
        check_series(series_dir, CUTE, ".py")  # before anything is fetched or written
    failures: list[str] = []
    network_seen = False  # a mirror failed for want of the network (the final hint says so only then)
    cached = cache_dir() / "fa4" / pin.commit
    for name, fetch in _mirrors(fa_src, pin, index, project):
        if name == "cache" and cached.is_symlink() and not cached.is_dir():  # a loop, a dangling link
            evict(cached, "is a broken link", "fetching from the next mirror",
                  f"flash-attention tree {pin.commit[:12]}")
        if name == "cache" and not cached.exists():
            failures.append("cache: empty")
            continue
        stage = "fetch"
        try:
            upstream, mirror = fetch()
            stage = "cmake"
            staging = work / "fa-src"
            shutil.rmtree(staging, ignore_errors=True)
            write_tree(upstream, staging / CUTE)
            rewritten = cmake_install_fa4(staging, work, pin.commit)
            got = tree_sha256(rewritten)
            stage = "hash"
            if got != pin.cute_tree_sha256:
                raise ForgeError(
                    f"flash-attention tree-hash mismatch from {mirror}: expected {pin.cute_tree_sha256}, got {got}",
                    f"that source is not flash-attention@{pin.commit[:12]}",
                )
        except (ForgeError, OSError, http.client.HTTPException, *MIRROR_DAMAGE) as e:
            refused = resource_refusal(e)
            if refused is not None:  # no other mirror does better with too few descriptors or no memory
                raise refused from None
            if stage == "cmake":  # the same CMake runs for every mirror: the tool's data, not the mirror
                if isinstance(e, ForgeError):
                    raise ForgeError(e.what, "reinstall vllm-forge, or fix the copy VLLM_FORGE_DATA_DIR points at "
                                             f"({e.hint})") from None
                raise
            what = e.what if isinstance(e, ForgeError) else f"{type(e).__name__}: {e}"
            if fa_src:
                if isinstance(e, ForgeError):
                    raise
                raise ForgeError(f"flash-attention from {fa_src}: {what}", "check --fa-src") from None
            network_seen = network_seen or _network_failure(e)
            failures.append(f"{name}: {what}")
            if name == "cache" and stage != "cmake":  # the cache repairs itself: the next mirror serves
                evict(cached, "failed its tree hash" if stage == "hash" else f"is unreadable ({what})",
                      "fetching from the next mirror", f"flash-attention tree {pin.commit[:12]}")
            else:
                print(f"  FA4 mirror {name} unusable: {what}", file=sys.stderr, flush=True)
            continue
        print(f"  FA4 sources: {len(rewritten)} files from {mirror}, tree hash verified", file=sys.stderr)
        if name not in ("cache", "base wheel"):
            _store_in_cache(upstream, pin.commit)
        result = Fa4Sources(rewritten, upstream, mirror, got, got)
        if series_dir is not None and series_dir.is_dir():
            result.patches = apply_series(series_dir, staging)
        if result.patches:
            result.files = cmake_install_fa4(staging, work, pin.commit)
            result.upstream = read_tree(staging / CUTE, "patched flash-attention")
            result.tree_sha256 = tree_sha256(result.files)
        return result
    raise ForgeError(
        f"no mirror delivered flash-attention@{pin.commit[:12]}: " + "; ".join(failures),
        "connect to the network (git or the package index), or pass --fa-src with a checkout of that commit"
        if network_seen else
        "the mirrors answered but none served that tree (see each reason); pass --fa-src with a checkout of "
        "that commit, or fix the mirror named",
    )


# what a damaged or hostile mirror raises while it is read (a zip over range requests, a tree)
MIRROR_DAMAGE = (zipfile.BadZipFile, EOFError, ValueError, UnicodeDecodeError)


def _network_failure(e: BaseException) -> bool:
    """The mirror failed because it could not be reached (not because it served something wrong)."""
    if isinstance(e, ForgeError):
        return e.what.startswith(("cannot reach", "the download", "no mirror")) or "broke off" in e.what
    return isinstance(e, (ConnectionError, TimeoutError, socket.gaierror, urllib.error.URLError,
                          http.client.HTTPException))


def _store_in_cache(tree: Tree, commit: str) -> None:
    """Best effort: a cache that cannot be written costs the next build a fetch, not this one."""
    dest = cache_dir() / "fa4" / commit
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    try:
        clear_cache_slot(dest, is_dir=True)
        shutil.rmtree(tmp, ignore_errors=True)
        write_tree(tree, tmp / CUTE)
        if dest.is_symlink():  # a link (a loop, say) is replaced, never followed
            dest.unlink()
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"vllm-forge: cannot cache the flash-attention tree in {dest.parent}: {e.strerror or e}; "
              "continuing without", file=sys.stderr)
