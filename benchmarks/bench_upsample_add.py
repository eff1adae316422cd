#!/usr/bin/env python3
"""Benchmark fastseg's FCN decoder ops (upsample_add, deconv_add) vs eager PyTorch and torch.compile.

    python benchmarks/bench_upsample_add.py [--quick] [--device cpu|cuda] [--out DIR]

Same as `fastseg bench --ops upsample_add ...` (all of its options work here too); writes
results.json, results.md and upsample_add.png into DIR (default bench-out/).
"""

import os
import sys

# Run from a source checkout without installing.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastseg.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["--ops", "upsample_add", *sys.argv[1:]]))
