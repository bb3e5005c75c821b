#!/usr/bin/env python3
"""Re-resolve the shipped vLLM releases from the package index (vllm_forge.pin) and print a table.

  python scripts/pin_releases.py [--versions 0.19.1 ...] [--write] [--index-url URL]

--write records each release's per-platform wheels (aarch64: file, sha256, the .py files that differ
from x86_64's) in pins.json; differences from pins.json's other fields are printed, never written.
A release the tool does not ship: `vllm-forge pin X` (user data directory).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vllm_forge.pin import pin_shipped
from vllm_forge.pins import data_dir, load_pins

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--versions", nargs="+")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--index-url")
    args = ap.parse_args()
    path = data_dir() / "pins.json"
    print(pin_shipped(args.versions or list(load_pins(path).vllm), path, args.index_url, args.write))
