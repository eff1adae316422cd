#!/usr/bin/env python3
"""Benchmark fastseg's softmax cross-entropy against eager PyTorch and torch.compile.

    python benchmarks/bench_cross_entropy.py [--quick] [--device cpu|cuda] [--out DIR]

Same as `fastseg bench --ops cross_entropy ...` (all of its options work here too); writes
results.json, results.md and cross_entropy.png into DIR (default bench-out/).
"""

import os
import sys

# Run from a source checkout without installing.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastseg.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["--ops", "cross_entropy", *sys.argv[1:]]))
