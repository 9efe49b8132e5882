"""Token-table gradients: torch's embedding backward (a sort per table) against kernels/embedding
(one sort, the run-sum kernel), forward + backward of the lookups, at the shapes training feeds.

    python -m deepwish.bench.embedding [--out DIR]

Shapes: gpt_124m's micro-batch (16 x 2048 ids of the installed-Python corpus's token law
approximated by a Zipf draw; the token embedding and three value tables, 50,304 x 768, fp32
weights, bf16 output gradients as autocast gives them) and Qwen3-0.6B's (8 x 2048 ids, one table
151,936 x 1,024). Prints ms per step and the bytes' roofline: each table's gradient written once
(V x D fp32) and its output gradient read once (N x D).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from deepwish.bench.env import copy_bw, doc_summary
from deepwish.bench.timing import median_ms
from deepwish.kernels.embedding import lookups


def zipf_ids(n: int, V: int, device, seed: int = 0) -> torch.Tensor:
    """Token ids with a Zipf(1) law over a random permutation of the vocabulary (text-like runs)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    p = 1.0 / torch.arange(1, V + 1, dtype=torch.float64)
    ranks = torch.multinomial(p / p.sum(), n, replacement=True, generator=g)
    return torch.randperm(V, generator=g)[ranks].to(device)


def case(name: str, n: int, V: int, widths: list[int], device) -> dict:
    ids = zipf_ids(n, V, device)
    tables = [torch.randn(V, d, device=device, requires_grad=True) for d in widths]
    cots = [torch.randn(n, d, device=device, dtype=torch.bfloat16) for d in widths]
    row = {"case": name, "N": n, "V": V, "widths": widths}
    for backend in ("torch", "triton"):
        def step():
            outs = lookups(ids, tables, backend)
            torch.autograd.backward([o.to(torch.bfloat16) for o in outs], cots)
        row[backend] = median_ms(step, grad_to_none=tables)
    bytes_min = sum(V * d * 4 + n * d * 2 for d in widths)
    row["roofline_ms"] = bytes_min / copy_bw() * 1e3
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deepwish.bench.embedding", description=doc_summary(__doc__))
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device("cuda")
    rows = [case("gpt_124m: embedding + 3 value tables", 16 * 2048, 50304, [768] * 4, device),
            case("qwen3_0.6b: embedding", 8 * 2048, 151936, [1024], device)]
    print("| case | torch ms | triton ms | torch / triton | bytes' roofline ms |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['torch']:.3f} | {r['triton']:.3f} | {r['torch'] / r['triton']:.2f} | "
              f"{r['roofline_ms']:.3f} |")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "embedding.json").write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                                                  "torch": torch.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
