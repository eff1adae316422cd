#!/usr/bin/env python3
"""Benchmark fastseg's whole models (FCN-8s, U-Net valid, U-Net same) vs eager PyTorch and torch.compile.

    python benchmarks/bench_models.py [--quick] [--device cpu|cuda] [--out DIR]

Same as `fastseg bench --ops models ...` (all of its options work here too); writes
results.json, results.md and models.png into DIR (default bench-out/).
"""

import os
import sys

# Run from a source checkout without installing.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastseg.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["--ops", "models", *sys.argv[1:]]))
