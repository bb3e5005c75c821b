#!/usr/bin/env python3
"""Carry a set of files larger than one device call (64 MiB) to the GPU machine in pieces.

Here:     write_batches(files, dest)  -> dest/batchNN/<file>.<offset> (<= 58 MiB each) + SHA256SUMS in batch00
There:    python3 scripts/gpu_carry.py recv .device/<set>/batchNN DIR
          copies the pieces under DIR/in, and every file whose pieces are all there and hash to its
          SHA256SUMS line is assembled into DIR/files (pieces removed). batch00 starts afresh; a later
          batch on a machine that went cold says so (start again with batch00). Prints what is missing.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

CARRY_LIMIT = 58 << 20  # a device call carries 64 MiB with the working tree


def batches(files: list[Path], limit: int = CARRY_LIMIT) -> list[list[tuple[Path, int, int]]]:
    """(file, offset, length) pieces in carry batches of at most `limit` bytes, in order: a file
    larger than a batch is split (the GPU machine concatenates the pieces)."""
    out: list[list[tuple[Path, int, int]]] = [[]]
    room = limit
    for f in files:
        size, off = f.stat().st_size, 0
        while off < size:
            if room == 0:
                out.append([])
                room = limit
            n = min(size - off, room)
            out[-1].append((f, off, n))
            off, room = off + n, room - n
    return out


def sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_batches(files: list[Path], dest: Path, limit: int = CARRY_LIMIT) -> None:
    for old in dest.glob("batch*"):
        shutil.rmtree(old)
    names = [f.name for f in files]
    assert len(set(names)) == len(names), "file names must be unique"
    for i, batch in enumerate(batches(files, limit)):
        d = dest / f"batch{i:02d}"
        d.mkdir(parents=True)
        for f, off, n in batch:
            with open(f, "rb") as src:
                src.seek(off)
                (d / f"{f.name}.{off:012d}").write_bytes(src.read(n))
        print(f"{d.name}: {sum(n for _, _, n in batch) / 2**20:.1f} MiB, {len(batch)} pieces", file=sys.stderr)
    (dest / "batch00" / "SHA256SUMS").write_text("".join(f"{sha256_file(f)}  {f.name}\n" for f in files))


def assemble(root: Path) -> tuple[dict[str, Path], list[str]]:
    """Files of root/in/SHA256SUMS complete under root/files; the names still missing."""
    sums = dict(reversed(ln.split("  ", 1)) for ln in (root / "in" / "SHA256SUMS").read_text().splitlines() if ln)
    done, missing = {}, []
    for name, digest in sums.items():
        whole = root / "files" / name
        if whole.is_file():
            done[name] = whole
            continue
        pieces = sorted((root / "in").glob(f"{name}.[0-9]*"), key=lambda p: int(p.suffix[1:]))
        expect = 0
        ok = bool(pieces)
        for p in pieces:
            ok = ok and int(p.suffix[1:]) == expect
            expect += p.stat().st_size
        if ok:
            whole.parent.mkdir(parents=True, exist_ok=True)
            with open(whole, "wb") as out:
                for p in pieces:
                    out.write(p.read_bytes())
            if sha256_file(whole) == digest:
                for p in pieces:
                    p.unlink()
                done[name] = whole
                continue
            whole.unlink()
        missing.append(name)
    return done, missing


def recv(batch: Path, root: Path) -> tuple[dict[str, Path], list[str]]:
    if (batch / "SHA256SUMS").is_file():  # batch00: a fresh start
        shutil.rmtree(root, ignore_errors=True)
    elif not (root / "in" / "SHA256SUMS").is_file():
        sys.exit("the machine went cold: start again with batch00")
    (root / "in").mkdir(parents=True, exist_ok=True)
    for f in batch.iterdir():
        shutil.copy(f, root / "in" / f.name)
    done, missing = assemble(root)
    print(f"{batch.name}: {len(done)} files complete, {len(missing)} missing"
          + (f" ({', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''})" if missing else ""), flush=True)
    return done, missing


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "recv":
        sys.exit(__doc__)
    _, missing = recv(Path(sys.argv[2]), Path(sys.argv[3]))
    sys.exit(0)
