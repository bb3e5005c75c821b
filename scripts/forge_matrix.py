#!/usr/bin/env python3
"""Forge and deep-verify every pinned vLLM release, one line each (the README's release table).

  python scripts/forge_matrix.py [--versions 0.19.1,0.33.0] [--out build/matrix] [--allow-unvalidated]

Each release runs `vllm-forge build` then `vllm-forge verify` in a fresh process, exactly as a user
would; a refusal is shown as the one line the tool printed. Downloads go to the tool's cache
(~300 MB a release). Prints a Markdown table and writes it to OUT/matrix.md.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from vllm_forge.pins import load_pins


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vllm_forge.cli", *args], capture_output=True, text=True,
                          check=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--versions", help="comma-separated (default: every release in pins.json)")
    ap.add_argument("--out", type=Path, default=Path("build/matrix"))
    ap.add_argument("--allow-unvalidated", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the forged wheels (default: delete after verify)")
    args = ap.parse_args()
    pins = load_pins()
    versions = args.versions.split(",") if args.versions else list(pins.vllm)
    rows = ["| vLLM | plan | FA pin | result | verify | s |", "|---|---|---|---|---|---|"]
    failed = 0
    for v in versions:
        vp = pins.vllm[v]
        out = args.out / v
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.monotonic()
        r = run("build", "--vllm", v, "--out", str(out), *(["--allow-unvalidated"] if args.allow_unvalidated else []))
        if r.returncode == 0:
            wheel = Path(r.stdout.strip().splitlines()[-1])
            ver = run("verify", str(wheel))
            verdict = "ok" if ver.returncode == 0 else ver.stderr.strip().splitlines()[-1]
            result = f"`{wheel.name}`"
            failed += ver.returncode != 0
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
        else:
            errors = [ln for ln in r.stderr.splitlines() if ln.startswith("vllm-forge: error:")]
            result, verdict = f"refused: {errors[-1] if errors else r.stderr.strip()[-300:]}", "-"
            failed += len(errors) != 1 or r.returncode != 2  # a refusal is one line and exit 2, never a crash
        pin = pins.fa.short if vp.plan == "backport" else vp.fa_short
        rows.append(f"| {v} | {vp.plan} | {pin} | {result} | {verdict} | {time.monotonic() - t0:.0f} |")
        print(rows[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "matrix.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
