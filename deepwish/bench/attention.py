"""`deepwish bench attention`: the own flash-attention kernels against their anchors, one GPU run.

    deepwish bench attention --out DIR                 (a representative subset of the grid, ~3 min on an H200)
    deepwish bench attention --out DIR --grid full     (the whole grid, 30 shapes, ~8 min)
    deepwish bench attention --out DIR --grid quick    (five shapes)
    deepwish bench attention --out DIR --grid goals    (the goals' eight shapes)
    deepwish bench attention --out DIR --dq-forms kernel,atomic,atomic_t --parts check,train --paths own,flex
                                                       (both backward forms of the own kernel side by side)

Training (bf16, fwd / bwd / fwd+bwd): own Triton kernel (kernels/attention/triton.py) vs
- SDPA with the dense boolean mask [B, 1, T, T] (the path the model took before): skipped, and
  said so, where that mask exceeds DENSE_MASK_MAX elements;
- FlexAttention with a block mask built once per batch (kernels/attention/flex.py);
- SDPA flash on plain causal input (no document isolation, no window): the speed anchor.
Documents per row are random cut points (seeded); windows count the query's own token. The own
kernel's document bounds and FlexAttention's block mask are built once per shape, outside the
timing (a model builds them once per batch).
TFLOP/s count only visible (query, key) pairs: fwd 2·pairs·H·(Dqk + Dv), bwd 2.5 × fwd
(FlashAttention's convention: the bwd recomputes the scores), SDPA-flash rows count causal pairs.
Decode: one new token (and 4 for speculative verification) over a full cache of L slots,
own split-KV kernel (kernels/attention/decode.py) vs SDPA; GB/s = K and V bytes read / time,
against the device copy bandwidth measured in the same run.
Before timing, every path is checked against the fp32 reference (relative RMS).
--dq-forms: the own kernel's backward forms to time (kernels/attention/triton.py: BACKWARD_DQ);
"own" is always the module's default form, every other listed form is the path "own_<form>"
(same forward, same inputs, timed in the same loop), printed beside "own" and FlexAttention.
"""
from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from deepwish.bench.env import bench_environment, doc_summary
from deepwish.bench.timing import graph_ms, median_ms, rel_rms

DENSE_MASK_MAX = 1 << 30  # elements of the [B, 1, T, T] mask SDPA is given (1 GiB as bool)
TOKENS = 16384  # tokens per step for T <= 16k (B = TOKENS // T)


def train_grid(grid: str) -> list[dict]:
    """(D, H, Hkv, T, docs per row, window) shapes (B: TOKENS // T unless a grid names it). `full`: T 2k/8k/16k/64k, documents 1/4/16,
    windows 512/4096, GQA 16/8 and 16/2, D 128/256, structured rather than a full product (each
    (B, T, D, G) is a fresh FlexAttention compile, ~20 s each); `default`: a
    representative subset of it with five FlexAttention compiles (T 2k/16k/64k at D128 16/8, T16k
    at D128 16/2 and D256 16/2; T8k only in `full`); `quick`: five shapes."""
    g = []
    def add(D, H, Hkv, T, docs, W, B=0):
        g.append(dict(D=D, H=H, Hkv=Hkv, T=T, B=B or max(1, TOKENS // T), docs=docs, window=W))
    if grid == "gpt":  # gpt_124m's own attention calls: one micro-batch of 16 × 2048 packed tokens, 6 heads
        # of 128 without GQA; its S layers' final window 512, L layers' 2048 (= causal within the
        # row), and 256, where the window schedule spends its early steps
        for W in (256, 512, 0):
            add(128, 6, 6, 2048, 4, W, B=16)
        return g
    if grid == "quick":  # the first measurements' shapes, one window, one 256-wide head
        add(128, 16, 8, 2048, 4, 0)
        add(128, 16, 8, 16384, 8, 0)
        add(128, 16, 8, 65536, 16, 0)
        add(128, 16, 8, 16384, 1, 4096)
        add(256, 16, 2, 16384, 4, 0)
        return g
    if grid == "goals":  # the goals' shape classes, four FlexAttention compiles: documents and a window
        # at the trainer's T2k, one document (the forward's plain-causal goal) and many at T16k / T64k
        add(128, 16, 8, 2048, 4, 0)
        add(128, 16, 8, 2048, 4, 512)
        add(128, 16, 8, 16384, 1, 0)
        add(128, 16, 8, 16384, 4, 0)
        add(128, 16, 8, 65536, 1, 0)
        add(128, 16, 8, 65536, 16, 0)
        add(256, 16, 2, 16384, 1, 0)
        add(256, 16, 2, 16384, 4, 0)
        return g
    if grid == "default":
        for T in (2048, 16384):
            for docs in (1, 4, 16):
                add(128, 16, 8, T, docs, 0)
        add(128, 16, 8, 2048, 4, 512)
        add(128, 16, 8, 16384, 4, 512)
        add(128, 16, 8, 16384, 4, 4096)
        add(128, 16, 8, 65536, 1, 0)
        add(128, 16, 8, 65536, 16, 0)
        add(128, 16, 8, 65536, 16, 4096)
        add(128, 16, 2, 16384, 4, 0)
        add(256, 16, 2, 16384, 1, 0)
        add(256, 16, 2, 16384, 4, 0)
        add(256, 16, 2, 16384, 4, 4096)
        return g
    for T in (2048, 8192, 16384, 65536):
        for docs in (1, 4, 16):
            add(128, 16, 8, T, docs, 0)
        for W in (512, 4096):
            add(128, 16, 8, T, 4, W)
    for T in (2048, 16384):
        add(128, 16, 2, T, 4, 0)
        add(128, 16, 2, T, 4, 4096)
        add(256, 16, 8, T, 4, 0)
    for T in (2048, 16384, 65536):
        add(256, 16, 2, T, 4, 0)
    add(256, 16, 2, 16384, 4, 4096)
    return g


def make_doc_ids(B: int, T: int, docs: int, gen: torch.Generator) -> torch.Tensor | None:
    if docs <= 1:
        return None
    ids = torch.zeros(B, T, dtype=torch.int32)
    for b in range(B):
        cuts = torch.randperm(T - 1, generator=gen)[: docs - 1] + 1
        ids[b, cuts] = 1
    return ids.cumsum(1)


def visible_pairs(B: int, T: int, doc_ids: torch.Tensor | None, window: int) -> int:
    """Number of visible (query, key) pairs per head."""
    from deepwish.kernels.documents import document_starts
    pos = torch.arange(T).expand(B, T)
    if doc_ids is not None:
        pos = pos - document_starts(doc_ids).long()
    seen = pos + 1
    if window > 0:
        seen = seen.clamp(max=window)
    return int(seen.sum())


# train rows faster than this (eager fwd+bwd) are also timed captured in a CUDA graph
GRAPH_BELOW_MS = 3.0


def own_form(form: str, fn):
    """`fn` with the own kernel's backward form (BACKWARD_DQ) set at each call: the backward
    launched later from the returned output uses it."""
    from deepwish.kernels.attention import triton as tk

    def call(*args, **kwargs):
        tk.BACKWARD_DQ = form
        return fn(*args, **kwargs)
    return call


def own_paths(forms: list[str], default: str) -> dict[str, str]:
    """{path name: backward form}: "own" = the default form, "own_<form>" the others."""
    return {"own": default, **{f"own_{f}": f for f in forms if f != default}}


def check_correctness(device, quick: bool = False, forms: list[str] | None = None) -> list[dict]:
    """Own kernel (fwd + all grads; every backward form in `forms`), flex and the decode kernel
    against the fp32 reference."""
    from deepwish.kernels.attention import triton as tk
    default = tk.BACKWARD_DQ
    try:
        return _check_correctness(device, quick, own_paths(forms or [], default))
    finally:
        tk.BACKWARD_DQ = default


def _check_correctness(device, quick: bool, own_forms: dict[str, str]) -> list[dict]:
    from deepwish.kernels.attention import reference as ref
    from deepwish.kernels.attention.decode import decode_attention
    from deepwish.kernels.attention.flex import flex_attention
    from deepwish.kernels.attention.triton import flash_attention
    gen = torch.Generator().manual_seed(0)
    rows = []
    cases = [  # B, T, H, Hkv, Dqk, Dv, docs, window, softcap, dtype
        (2, 1000, 16, 8, 128, 128, 4, 0, 0.0, torch.bfloat16),
        (2, 1000, 16, 2, 128, 128, 16, 256, 0.0, torch.bfloat16),
        (1, 1500, 16, 2, 256, 256, 3, 0, 0.0, torch.bfloat16),
        (1, 777, 8, 8, 192, 128, 2, 0, 0.0, torch.bfloat16),
        (1, 1024, 8, 1, 64, 64, 5, 100, 30.0, torch.float16),
        (1, 513, 4, 2, 128, 128, 3, 64, 0.0, torch.float32),
    ]
    if quick:  # the shape classes the timings use
        cases = [(2, 1000, 16, 8, 128, 128, 4, 300, 0.0, torch.bfloat16), (1, 1500, 16, 2, 256, 256, 3, 0, 0.0, torch.bfloat16)]
    for B, T, H, Hkv, D, Dv, docs, W, cap, dt in cases:
        q = torch.randn(B, T, H, D, generator=gen).to(device, dt).requires_grad_()
        k = torch.randn(B, T, Hkv, D, generator=gen).to(device, dt).requires_grad_()
        v = torch.randn(B, T, Hkv, Dv, generator=gen).to(device, dt).requires_grad_()
        ids = make_doc_ids(B, T, docs, gen)
        ids = None if ids is None else ids.to(device)
        g = torch.randn(B, T, H, Dv, generator=gen).to(device)
        want = ref.attention(q, k, v, doc_ids=ids, window=W, softcap=cap)
        wg = torch.autograd.grad((want.float() * g).sum(), (q, k, v))
        row = dict(case=f"B{B} T{T} H{H}/{Hkv} D{D}/{Dv} docs{docs} W{W} cap{cap} {str(dt)[6:]}")
        owns = [(name, own_form(form, flash_attention)) for name, form in own_forms.items()]
        for name, fn in (*owns, ("flex", flex_attention)):
            if name == "flex" and quick:
                continue
            if name == "flex" and (dt == torch.float32 or D != Dv or D > 128 and dt != torch.bfloat16):
                continue
            try:
                got = fn(q, k, v, doc_ids=ids, window=W, softcap=cap)
                gg = torch.autograd.grad((got.float() * g).sum(), (q, k, v))
                row[name] = [rel_rms(want, got)] + [rel_rms(a, b) for a, b in zip(wg, gg)]
            except Exception as e:  # noqa: BLE001
                row[name] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
        rows.append(row)
    for B, Tq, L, W, ring in ((1, 1, 32768, 0, False), (8, 4, 4096, 0, False), (2, 3, 1000, 256, True))[:1 if quick else 3]:
        q = torch.randn(B, Tq, 16, 128, generator=gen).to(device, torch.bfloat16)
        kc = torch.randn(B, 8, L, 128, generator=gen).to(device, torch.bfloat16)
        vc = torch.randn(B, 8, L, 128, generator=gen).to(device, torch.bfloat16)
        if ring:
            kp = torch.randint(0, 3000, (B, L), generator=gen).to(device)
            qp = (torch.arange(Tq) + 2990).expand(B, Tq).to(device)
        else:
            kp = None
            qp = (torch.arange(Tq) + L - Tq).expand(B, Tq).to(device)
        want = ref.decode_attention(q, kc, vc, qp, torch.arange(L, device=device).expand(B, L) if kp is None else kp,
                                    window=W)
        got = decode_attention(q, kc, vc, qp, kp, window=W)
        rows.append(dict(case=f"decode B{B} Tq{Tq} L{L} W{W} ring{ring}", own=[rel_rms(want, got)]))
    return rows


def bench_train(device, grid: str, only: set[str], path: Path, forms: list[str] | None = None) -> list[dict]:
    from deepwish.kernels.attention import triton as tk
    default = tk.BACKWARD_DQ
    try:
        return _bench_train(device, grid, only, path, own_paths(forms or [], default))
    finally:
        tk.BACKWARD_DQ = default


def _bench_train(device, grid: str, only: set[str], path: Path, own_forms: dict[str, str]) -> list[dict]:
    import torch._dynamo
    from deepwish.kernels.attention.flex import block_mask, flex_attention
    from deepwish.kernels.attention.triton import document_bounds, flash_attention
    from deepwish.model.attention import attention_mask
    torch._dynamo.config.cache_size_limit = 64
    gen = torch.Generator().manual_seed(1)
    rows = []
    for s in train_grid(grid):
        B, T, H, Hkv, D, docs, W = s["B"], s["T"], s["H"], s["Hkv"], s["D"], s["docs"], s["window"]
        ids_cpu = make_doc_ids(B, T, docs, gen)
        pairs = visible_pairs(B, T, ids_cpu, W)
        causal_pairs = B * T * (T + 1) // 2
        fwd_flop = 2.0 * pairs * H * (D + D)
        ids = None if ids_cpu is None else ids_cpu.to(device)
        q = torch.randn(B, T, H, D, device=device, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(B, T, Hkv, D, device=device, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(B, T, Hkv, D, device=device, dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(B, T, H, D, device=device, dtype=torch.bfloat16)
        row = dict(s, pairs=pairs, sparsity=1 - pairs / causal_pairs)
        qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
        gt = g.transpose(1, 2)

        def flex_fn(mask=None):
            return lambda: flex_attention(q, k, v, doc_ids=ids, window=W, mask=mask)

        # the document description is built once per batch, as FlexAttention's block mask is
        bounds = document_bounds(ids, B, T, device)
        paths = {name: (own_form(form, lambda: flash_attention(q, k, v, doc_ids=ids, window=W, bounds=bounds)),
                        (q, k, v), g, fwd_flop)
                 for name, form in own_forms.items() if "own" in only}
        if "flex" in only:
            try:
                fm = block_mask(B, T, ids, W, device)
                paths["flex"] = (flex_fn(fm), (q, k, v), g, fwd_flop)
            except Exception as e:  # noqa: BLE001
                row["flex"] = f"error: {type(e).__name__}"
        if "sdpa_mask" not in only:
            pass
        elif B * T * T <= DENSE_MASK_MAX:
            pos = torch.arange(T, device=device).expand(B, T)
            dm = attention_mask(pos, pos, W, ids, ids) if (ids is not None or W) else None
            paths["sdpa_mask"] = ((lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=dm, is_causal=dm is None,
                                                                            enable_gqa=True)),
                                  (qt, kt, vt), gt, fwd_flop)
        else:
            row["sdpa_mask"] = f"skipped: the dense mask [B,1,T,T] has {B * T * T / 2**30:.0f} Gi elements"
        paths["sdpa_flash_causal"] = ((lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True,
                                                                               enable_gqa=True)),
                                      (qt, kt, vt), gt, 2.0 * causal_pairs * H * (D + D))
        for name, (fn, leaves, grad, flop) in paths.items():
            if name not in only and not name.startswith("own_"):
                continue
            try:
                fwd = median_ms(fn)
                fb = median_ms(lambda: fn().backward(grad), grad_to_none=list(leaves))
                row[name] = dict(fwd_ms=fwd, fwdbwd_ms=fb, bwd_ms=fb - fwd, fwd_tflops=flop / fwd / 1e9,
                                 bwd_tflops=2.5 * flop / max(fb - fwd, 1e-6) / 1e9, fwdbwd_tflops=3.5 * flop / fb / 1e9)
            except Exception as e:  # noqa: BLE001
                row[name] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:100]}"
                torch.cuda.empty_cache()
                continue
            if fb < GRAPH_BELOW_MS:
                # A call of ~1 ms pays the host's launches and autograd in eager timing; the trainer
                # runs it inside compiled blocks. Captured in a CUDA graph the host is out of the time.
                try:
                    row[name]["fwdbwd_graph_ms"] = graph_ms(lambda: torch.autograd.grad(fn(), list(leaves), grad))
                except Exception as e:  # noqa: BLE001 - some paths do not capture; the eager figure stands
                    row[name]["fwdbwd_graph_ms"] = f"error: {type(e).__name__}"
        rows.append(row)
        path.write_text(json.dumps(rows, indent=1, default=str))
        print(fmt_train_row(row), flush=True)
        del q, k, v, g, qt, kt, vt, paths
        torch.cuda.empty_cache()
    return rows


def bench_decode(device, quick: bool, copy_gbs: float) -> list[dict]:
    from deepwish.kernels.attention.decode import decode_attention
    rows = []
    H, Hkv, D = 16, 8, 128
    if quick:
        grid = [(4096, 1, 1), (32768, 1, 1), (32768, 1, 4), (32768, 8, 1), (131072, 1, 1)]
    else:
        grid = [(L, B, Tq) for L in (4096, 32768, 131072) for B in (1, 8, 64) for Tq in ((1, 4) if B <= 8 else (1,))]
    for L, B, Tq in grid:
        if B * L * Hkv * D * 4 > 40e9:
            continue
        kc = torch.randn(B, Hkv, L, D, device=device, dtype=torch.bfloat16)
        vc = torch.randn(B, Hkv, L, D, device=device, dtype=torch.bfloat16)
        q = torch.randn(B, Tq, H, D, device=device, dtype=torch.bfloat16)
        qp = (torch.arange(Tq, device=device) + L - Tq).expand(B, Tq).contiguous()
        nbytes = 2 * kc.numel() * 2
        row = dict(L=L, B=B, Tq=Tq, kv_bytes=nbytes)
        qt = q.transpose(1, 2)
        mask = (torch.arange(L, device=device)[None, :] <= qp[0][:, None])[None, None] if Tq > 1 else None
        for name, fn in (("own", lambda: decode_attention(q, kc, vc, qp)),
                         ("sdpa", lambda: F.scaled_dot_product_attention(qt, kc, vc, attn_mask=mask,
                                                                         enable_gqa=True))):
            try:
                ms = median_ms(fn)
                row[name] = dict(us=ms * 1e3, gbs=nbytes / ms / 1e6, of_copy=nbytes / ms / 1e6 / copy_gbs)
                gms = graph_ms(fn)  # the decode step runs captured: launch overhead out
                row[name].update(graph_us=gms * 1e3, graph_gbs=nbytes / gms / 1e6,
                                 graph_of_copy=nbytes / gms / 1e6 / copy_gbs)
            except Exception as e:  # noqa: BLE001
                row[name] = f"error: {type(e).__name__}"
                torch.cuda.empty_cache()
        rows.append(row)
        print(fmt_decode_row(row), flush=True)
        del kc, vc
        torch.cuda.empty_cache()
    return rows


def ceilings(device) -> dict:
    x = torch.empty(1 << 30, dtype=torch.uint8, device=device).random_()
    y = torch.empty_like(x)
    ms = median_ms(lambda: y.copy_(x))
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    mm = median_ms(lambda: a @ b)
    return dict(copy_gbs=2 * x.numel() / ms / 1e6, matmul_tflops=2 * 8192 ** 3 / mm / 1e9)


def fmt_cell(r, key="fwdbwd_ms"):
    if isinstance(r, dict):
        return f"{r[key]:.3f}"
    return "skip" if r is None or str(r).startswith("skip") else "err"


def fmt_train_row(r) -> str:
    own, flex = r.get("own"), r.get("flex")
    ratio = (flex["fwdbwd_ms"] / own["fwdbwd_ms"]) if isinstance(own, dict) and isinstance(flex, dict) else float("nan")
    fwd_vs = (own["fwd_tflops"] / r["sdpa_flash_causal"]["fwd_tflops"]
              if isinstance(own, dict) and isinstance(r.get("sdpa_flash_causal"), dict) else float("nan"))
    tf = own["fwd_tflops"] if isinstance(own, dict) else float("nan")
    return (f"D{r['D']} {r['H']}/{r['Hkv']} B{r['B']} T{r['T']} docs{r['docs']} W{r['window']}: fwd+bwd ms "
            f"own {fmt_cell(own)} flex {fmt_cell(flex)} sdpa_mask {fmt_cell(r.get('sdpa_mask'))} "
            f"flash_causal {fmt_cell(r.get('sdpa_flash_causal'))} | own/flex x{ratio:.2f} | own fwd {tf:.0f} TF/s "
            f"= {fwd_vs:.2f} of flash" + fmt_graph(r) + fmt_forms(r))


def fmt_graph(r) -> str:
    """The captured (CUDA graph) fwd+bwd times of a short row beside the eager ones, '' otherwise."""
    own, flex = r.get("own"), r.get("flex")
    g = {k: x.get("fwdbwd_graph_ms") for k, x in (("own", own), ("flex", flex)) if isinstance(x, dict)}
    if not any(v is not None for v in g.values()):
        return ""
    cells = [f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in g.items() if v is not None]
    ratio = (g["flex"] / g["own"]) if all(isinstance(g.get(k), float) for k in ("own", "flex")) else float("nan")
    return " | captured f+b ms " + " ".join(cells) + f" own/flex x{ratio:.2f}"


def fmt_forms(r) -> str:
    """The own kernel's backward forms side by side (rows timed with --dq-forms), '' otherwise."""
    others = sorted(k for k in r if k.startswith("own_"))
    if not others:
        return ""
    own, flex = r.get("own"), r.get("flex")
    flex_ms = flex["fwdbwd_ms"] if isinstance(flex, dict) else float("nan")
    cells = []
    for name in ["own", *others]:
        x = r.get(name)
        if isinstance(x, dict):
            vs = own["bwd_ms"] / max(x["bwd_ms"], 1e-9) if isinstance(own, dict) else float("nan")
            cells.append(f"{name} bwd {x['bwd_ms']:.3f} (x{vs:.2f} of own) f+b {x['fwdbwd_ms']:.3f} "
                         f"/flex x{flex_ms / x['fwdbwd_ms']:.2f}")
        else:
            cells.append(f"{name} {fmt_cell(x)}")
    return "\n    backward forms: " + " | ".join(cells) + f" | flex f+b {fmt_cell(flex)}"


def fmt_decode_row(r) -> str:
    own, sd = r.get("own"), r.get("sdpa")
    o = (f"{own['us']:.1f}us {own['gbs']:.0f}GB/s ({own['of_copy']:.0%} of copy), graph {own['graph_us']:.1f}us "
         f"({own['graph_of_copy']:.0%})" if isinstance(own, dict) else str(own))
    s = (f"{sd['us']:.1f}us {sd['gbs']:.0f}GB/s, graph {sd['graph_us']:.1f}us ({sd['graph_of_copy']:.0%})"
         if isinstance(sd, dict) else str(sd))
    return f"decode L{r['L']} B{r['B']} Tq{r['Tq']}: own {o} | sdpa {s}"


def plot(train: list[dict], decode: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(16, 6))
    labels = [f"D{r['D']} {r['H']}/{r['Hkv']} T{r['T'] // 1024}k d{r['docs']} W{r['window']}" for r in train]
    x = range(len(train))
    for i, name in enumerate(("own", "flex", "sdpa_mask", "sdpa_flash_causal")):
        ys = [r[name]["fwdbwd_tflops"] if isinstance(r.get(name), dict) else 0 for r in train]
        a1.bar([xi + 0.2 * i for xi in x], ys, width=0.2, label=name)
    a1.set_xticks([xi + 0.3 for xi in x], labels, rotation=80, fontsize=7)
    a1.set_ylabel("fwd+bwd TFLOP/s (visible pairs only)")
    a1.legend()
    a1.set_title("training attention, bf16")
    for name in ("own", "sdpa"):
        for B in sorted({r["B"] for r in decode}):
            pts = [(r["L"], r[name].get("graph_gbs", r[name]["gbs"])) for r in decode
                   if r["B"] == B and r["Tq"] == 1 and isinstance(r.get(name), dict)]
            if pts:
                a2.plot(*zip(*pts), marker="o", label=f"{name} B{B}")
    a2.set_xscale("log", base=2)
    a2.set_xlabel("context (slots)")
    a2.set_ylabel("KV GB/s (CUDA graph replays)")
    a2.legend()
    a2.set_title("decode, 1 token, H16/8 D128")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def environment(device) -> dict:
    return bench_environment(device, "deepwish bench attention")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="deepwish bench attention", description=doc_summary(__doc__))
    p.add_argument("--out", required=True)
    p.add_argument("--grid", default="default", choices=("default", "full", "quick", "goals", "gpt"),
                   help="training shapes: a representative subset (default), the full grid, five, the "
                        "goals' eight (documents, a window, one document at T16k/T64k, D256), or gpt_124m's "
                        "own (B16 T2k, 6 heads, windows 256/512/none)")
    p.add_argument("--quick", action="store_true", help="= --grid quick, and the short check and decode lists")
    p.add_argument("--tiles", default=None, help="JSON of launch configs from deepwish.bench.attention_tiles "
                                                 "(applied over kernels/attention/triton.py: TILES)")
    p.add_argument("--decode-per-sm", type=int, default=None, help="split-KV programs per SM (decode.py default)")
    p.add_argument("--parts", default="check,train,decode", help="comma list, in order: check,train,decode")
    p.add_argument("--paths", default="own,flex,sdpa_mask,sdpa_flash_causal", help="training paths to time")
    p.add_argument("--dq-forms", default="", help="comma list of the own kernel's backward forms to time side "
                                                  "by side: kernel,atomic,atomic_t (kernels/attention/triton.py: "
                                                  "BACKWARD_DQ)")
    args = p.parse_args(argv)
    forms = [x for x in args.dq_forms.split(",") if x]
    bad = [f for f in forms if f not in ("kernel", "atomic", "atomic_t")]
    if bad:
        print(f"error: --dq-forms takes kernel, atomic, atomic_t, got {','.join(bad)}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: deepwish bench attention needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = [x for x in args.parts.split(",") if x]
    only = set(args.paths.split(","))
    if args.quick:
        args.grid = "quick"
    from deepwish.kernels.attention import decode as decode_mod
    from deepwish.kernels.attention import triton as triton_mod
    if args.tiles:
        for key, cfg in json.loads(Path(args.tiles).read_text()).items():
            if key.startswith("loads|"):  # the sweep's K/V load form per (kernel, class); LOADS is per kernel
                triton_mod.LOADS[key.split("|")[1]] = cfg
            else:
                triton_mod.TILES[tuple(key.split("|"))] = tuple(cfg)
    if args.decode_per_sm:
        decode_mod.DECODE_PROGRAMS_PER_SM = args.decode_per_sm
    res = dict(env=environment(device), ceilings=ceilings(device), paths=sorted(only), grid=args.grid,
               backward_dq=triton_mod.BACKWARD_DQ, dq_forms=forms,
               tiles={"|".join(k): v for k, v in triton_mod.TILES.items()}, loads=dict(triton_mod.LOADS),
               decode_programs_per_sm=decode_mod.DECODE_PROGRAMS_PER_SM)
    print(json.dumps(res, indent=1), flush=True)
    run = {"check": lambda: check_correctness(device, args.quick, forms),
           "train": lambda: bench_train(device, args.grid, only, out / "train_rows.json", forms),
           "decode": lambda: bench_decode(device, args.quick, res["ceilings"]["copy_gbs"])}
    for part in parts:
        fn = run[part]
        try:
            res[part] = fn()
        except Exception:  # noqa: BLE001
            res[part] = "error: " + traceback.format_exc()[-2000:]
            print(res[part], flush=True)
        if part == "check":
            for r in res[part] if isinstance(res[part], list) else []:
                print(r, flush=True)
        (out / "attention.json").write_text(json.dumps(res, indent=1, default=str))
    if isinstance(res.get("train"), list) and isinstance(res.get("decode"), list):
        plot(res["train"], res["decode"], str(out / "attention.png"))
    for r in res.get("train", []) if isinstance(res.get("train"), list) else []:
        print(fmt_train_row(r))
    for r in res.get("decode", []) if isinstance(res.get("decode"), list) else []:
        print(fmt_decode_row(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
