#!/usr/bin/env python3
"""Benchmark jail against the alternatives: rule cost, start-up, per-request cost, memory, bulk transfers.
See bench/README.md. Installs nothing, sends traffic only over loopback, and stops every process it started
on any exit."""

import sys
from pathlib import Path

# `python bench/run.py` from anywhere: the package is imported from the repository it sits in.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.main import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
