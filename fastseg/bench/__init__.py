"""fastseg's benchmarks: fused ops vs eager PyTorch vs torch.compile.

    fastseg bench [--quick] [--device cpu|cuda|auto] [--out DIR] [--ops cross_entropy]

calls `main(argv)`. The harness (timing, memory, bytes, reports) is in
`fastseg.bench.harness`; each op has one suite module, registered in `SUITES` below. To add
an op: write `fastseg/bench/<op>.py` with a `harness.Suite` subclass and `SUITE = ...`, and add
one line here.
"""

from __future__ import annotations

from collections.abc import Sequence

# op name -> module defining SUITE (a fastseg.bench.harness.Suite). Run in this order.
SUITES: dict[str, str] = {
    "cross_entropy": "fastseg.bench.cross_entropy",
    "upsample_add": "fastseg.bench.upsample_add",
    "crop_concat_conv": "fastseg.bench.crop_concat_conv",
    "models": "fastseg.bench.models",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `fastseg bench`; argv excludes the program and "bench". Returns the exit
    code: 0, or 1 when a fastseg or eager run errored or a fused result failed its check."""
    from fastseg.bench import harness

    return harness.cli(argv, SUITES)


__all__ = ["SUITES", "main"]
