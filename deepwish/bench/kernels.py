"""`deepwish bench kernels`: every own kernel against its anchors, one GPU run.

Runs the gated-delta benchmark (`bench/gdn.py`: chunked forward/backward vs
flash-linear-attention and torch SDPA, decode-step bandwidth) and the short-conv / fused
linear cross-entropy benchmark (`bench/kernels_conv_lce.py`) into one output folder.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from deepwish.bench.env import doc_summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="deepwish bench kernels", description=doc_summary(__doc__))
    p.add_argument("--out", required=True, help="output folder (gdn/ and conv_lce/ inside)")
    p.add_argument("--only", choices=("gdn", "conv", "lce"), default=None, help="run one part only")
    args = p.parse_args(argv)
    out = Path(args.out)
    from deepwish.bench import gdn, kernels_conv_lce
    if args.only in (None, "gdn"):
        gdn.main(["--out", str(out / "gdn")])
    if args.only in (None, "conv", "lce"):
        extra = ["--only", args.only] if args.only else []
        kernels_conv_lce.main(["--out", str(out / "conv_lce"), *extra])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
