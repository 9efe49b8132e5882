"""The fused loss's row kernel (kernels/linear_cross_entropy) at the chunks training feeds it, and
the whole loss beside `torch.compile` of the plain loss.

    python -m deepwish.bench.lce_rows [--out DIR]

Row kernel: one chunk of 2048 bf16 logit rows, the lse and the gradient passes (what the training
forward runs per chunk), at V = 50,304 with the GPT presets' soft-cap 15 (with the GPU's tanh
instruction and with the exact exp-based form), without a cap, and at V = 151,936 (Qwen3); GB/s
over the minimal bytes (each logit read once and written once) against the copy bandwidth.
Whole loss: forward + backward, mean, bf16, targets checked by the caller as the trainer does, at gpt_124m's micro-batch (32,768 x 768 x 50,304,
cap 15) and at Qwen3-0.6B's goal shape (16,384 x 1,024 x 151,936), against torch.compile of
`F.cross_entropy(softcap(h @ W.T).float())`, with the three GEMMs' time at the measured peak.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from deepwish.bench.env import copy_bw, doc_summary
from deepwish.bench.timing import median_ms
from deepwish.kernels.linear_cross_entropy import triton as lce
from deepwish.train.mfu import device_peak_flops

ROWS = 2048


def row_case(V: int, softcap: float | None, hw_tanh: bool, device) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(ROWS, V, device=device, generator=g) * 4).to(torch.bfloat16)
    targets = torch.randint(0, V, (ROWS,), device=device, generator=g)
    lse = torch.empty(ROWS, device=device)
    tl_ = torch.empty(ROWS, device=device)
    g_loss = torch.full((ROWS,), 1.0 / ROWS, device=device)
    g_lp = torch.zeros(ROWS, device=device)
    work = logits.clone()
    original = lce.hardware_tanh
    lce.hardware_tanh = (lambda t: original(t)) if hw_tanh else (lambda t: False)
    try:
        def run():
            work.copy_(logits)  # the kernel writes the gradient in place: time it on fresh logits
            lce._launch_rows(work, work, targets, lse, tl_, g_loss, g_lp, 0.0, softcap, True, True)
        copy_ms = median_ms(lambda: work.copy_(logits))
        ms = median_ms(run) - copy_ms
    finally:
        lce.hardware_tanh = original
    gbps = 2 * ROWS * V * 2 / (ms * 1e-3) / 1e9
    return {"V": V, "softcap": softcap, "hw_tanh": hw_tanh and softcap is not None, "us": round(ms * 1e3, 1),
            "GB/s": round(gbps), "of_copy": round(gbps * 1e9 / copy_bw(), 3)}


def loss_case(name: str, N: int, D: int, V: int, softcap: float | None, device) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(N, D, device=device, generator=g).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(V, D, device=device, generator=g) * D ** -0.5).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, V, (N,), device=device, generator=g)

    def plain(h, w, t):
        z = (h @ w.t()).float()
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        return torch.nn.functional.cross_entropy(z, t)

    compiled = torch.compile(plain)
    peak, _ = device_peak_flops(device)  # train/mfu.py PEAKS: the GPU's measured bf16 matmul rate
    out = {"case": name, "N": N, "D": D, "V": V, "softcap": softcap,
           "gemms_ms_at_peak": round(3 * 2 * N * D * V / peak * 1e3, 2) if peak else None}
    for label, fn in (("fused", lambda: lce.linear_cross_entropy(h, w, t, softcap=softcap, check_targets=False)),
                      ("compile", lambda: compiled(h, w, t))):
        def step():
            fn().backward()
        out[label + "_ms"] = round(median_ms(step, grad_to_none=[h, w], warmup=5, rep=20), 3)
    out["fused/compile"] = round(out["fused_ms"] / out["compile_ms"], 3)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deepwish.bench.lce_rows", description=doc_summary(__doc__))
    p.add_argument("--out", default=None, help="folder for lce_rows.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench lce_rows: needs a CUDA GPU (the row kernel's timings are what it reports)")
    dev = torch.device("cuda")
    rows = [row_case(50304, 15.0, True, dev), row_case(50304, 15.0, False, dev), row_case(50304, None, False, dev),
            row_case(151936, None, False, dev)]
    print(f"row kernel, {ROWS} bf16 rows, lse + gradient passes:")
    for r in rows:
        print(f"  V {r['V']:>7,} cap {r['softcap']} hw_tanh {r['hw_tanh']!s:5}: {r['us']:7.1f} us  "
              f"{r['GB/s']:5} GB/s ({100 * r['of_copy']:.0f}% of copy)")
    losses = [loss_case("gpt_124m micro-batch", 32768, 768, 50304, 15.0, dev),
              loss_case("qwen3_0.6b goal shape", 16384, 1024, 151936, None, dev)]
    for r in losses:
        print(f"loss {r['case']}: fused {r['fused_ms']} ms, torch.compile {r['compile_ms']} ms "
              f"(fused/compile {r['fused/compile']}), 3 GEMMs at peak {r['gemms_ms_at_peak']} ms")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "lce_rows.json").write_text(json.dumps(
            {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows, "loss": losses}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
