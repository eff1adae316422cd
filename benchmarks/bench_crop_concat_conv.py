#!/usr/bin/env python3
"""Benchmark fastseg's U-Net decoder op (crop_concat_conv2d) vs eager PyTorch and torch.compile.

    python benchmarks/bench_crop_concat_conv.py [--quick] [--device cpu|cuda] [--out DIR]

Same as `fastseg bench --ops crop_concat_conv ...` (all of its options work here too); writes
results.json, results.md and crop_concat_conv.png into DIR (default bench-out/).
"""

import os
import sys

# Run from a source checkout without installing.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastseg.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["--ops", "crop_concat_conv", *sys.argv[1:]]))
