"""The `fastseg` command: `fastseg info`, `fastseg bench`."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastseg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, build, and which backends serve each op")
    p_info.add_argument("--json", action="store_true", help="print JSON instead of text")
    sub.add_parser("bench", help="benchmark fused ops against eager and torch.compile",
                   add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        import fastseg
        print(json.dumps(fastseg.info(), indent=2, default=str) if args.json
              else fastseg.info(as_text=True))
        return 0
    if args.command == "bench":
        from fastseg import bench
        return bench.main(rest) or 0
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
