#!/usr/bin/env python3
"""The benchmark from a clone: the same as `edgellm bench` (arguments are passed on).

    .venv/bin/python scripts/bench.py --quick
    .venv/bin/python scripts/bench.py --native-dir /path/to/llama.cpp/build/bin --plot bench.png

docs/benchmarks.md explains the figures, the targets and how to build the native peers.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
