"""Benchmark of the gated delta rule (Gated DeltaNet) kernels against flash-linear-attention and
causal softmax attention at the same shapes.

    python -m deepwish.bench.gdn --out reports/gdn

Shapes: B = 1, H = HV = 16, K = V = 128, bf16 inputs, fp32 state; T in `seqlens`. Decode: one step
at batch 1 / 8 / 64, fp32 state [B, 16, 128, 128] updated in place.
Before timing, the Triton forward and gradients are checked against the fp32 torch reference (and
fla's forward, when it runs) at T = 4096; the relative RMS errors are printed and stored.

Times are the median of `triton.testing.do_bench`. Throughput figures use these conventions:
- chunked gated delta forward FLOPs per chunk of C = 64 and head: 6 C K V + 6 C^2 K + 4 C^2 V
  (k k^T, w, u, w S, the state update, q S, q k^T and the intra-chunk product); fwd + bwd = 3x fwd.
- causal attention forward FLOPs: 2 B H T^2 D; fwd + bwd = 3.5x fwd (FlashAttention's convention).
- decode GB/s: bytes of state read and written plus q, k, v, o; compared with the running GPU's
  measured device copy, TFLOP/s with its measured bf16 matmul peak (train/mfu.py PEAKS; the H100's
  2973 GB/s and 777 TFLOP/s where the table has none).
`--against FILE` times only ours against another version of kernels/gated_delta/triton.py, alternating.
`--profile-T T` (default 65536; 0: off) also lists the forward's kernels of ours and of fla's at T
by GPU time (torch.profiler): which stage (intra-chunk, state passing, output) is where the two differ;
and the tiles every autotuned kernel took.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Callable

import torch
import torch.nn.functional as F

from deepwish.bench.env import H100_COPY_BW, H100_MATMUL_FLOPS, bench_environment, ceilings, doc_summary
from deepwish.bench.timing import kernel_times, median_ms, rel_rms

COPY_PEAK_GBS = H100_COPY_BW / 1e9  # table defaults: the H100's ceilings (bench/env.py ceilings)
MATMUL_PEAK_TFLOPS = H100_MATMUL_FLOPS / 1e12
B, H, D = 1, 16, 128
CHUNK = 64
DECODE_BATCHES = (1, 8, 64)
REF_MAX_T_FWD = 8192       # the torch chunked reference loops over chunks in Python
REF_MAX_T_BWD = 4096


def gdn_fwd_flops(T: int, heads: int = H, K: int = D, V: int = D) -> float:
    C = CHUNK
    n_chunks = -(-T // C)
    return B * heads * n_chunks * (6 * C * K * V + 6 * C * C * K + 4 * C * C * V)


def attn_fwd_flops(T: int) -> float:
    return 2.0 * B * H * T * T * D


def decode_bytes(batch: int, heads: int = H, K: int = D, V: int = D) -> float:
    state = batch * heads * K * V * 4 * 2
    vectors = batch * heads * (2 * K + 2 * V) * 2
    return float(state + vectors)


def make_inputs(T: int, device, dtype=torch.bfloat16, batch: int = B):
    from deepwish.kernels.gated_delta.reference import l2norm
    q = l2norm(torch.randn(batch, T, H, D, device=device)).to(dtype)
    k = l2norm(torch.randn(batch, T, H, D, device=device)).to(dtype)
    v = torch.randn(batch, T, H, D, device=device, dtype=dtype)
    g = F.logsigmoid(torch.randn(batch, T, H, device=device) + 2.0)
    beta = torch.sigmoid(torch.randn(batch, T, H, device=device))
    return q, k, v, g, beta


def fwd_bwd_step(chunk: Callable, inputs, do: torch.Tensor | None = None) -> Callable:
    """The unit every forward + backward figure here times: step() runs chunk(q, k, v, g, beta) on
    fresh leaves of `inputs` and its backward against the output gradient `do` (random when None),
    returning (o, dq, dk, dv, dg, dbeta)."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    do = torch.randn_like(inputs[2]) if do is None else do

    def step():
        o = chunk(*leaves)
        return (o, *torch.autograd.grad(o, leaves, do))
    return step


def load_backends() -> dict[str, dict[str, Callable | None]]:
    """name -> {'chunk': f(q, k, v, g, beta) -> o, 'step': f(q1, k1, v1, g1, beta1, state) -> o}."""
    from deepwish.kernels.gated_delta import (chunk_gated_delta_rule, chunk_gated_delta_rule_ref,
                                              fused_recurrent_gated_delta_step, recurrent_gated_delta_step_ref)
    backends: dict[str, dict] = {
        "torch": {"chunk": lambda q, k, v, g, beta: chunk_gated_delta_rule_ref(q, k, v, g, beta)[0],
                  "step": lambda q, k, v, g, beta, S: S.copy_(recurrent_gated_delta_step_ref(q, k, v, g, beta, S)[1])},
        "triton": {"chunk": lambda q, k, v, g, beta: chunk_gated_delta_rule(q, k, v, g, beta)[0],
                   "step": fused_recurrent_gated_delta_step},
    }
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as fla_recurrent
    except Exception as e:  # noqa: BLE001 - any import failure means "fla not available here"
        print(f"[gdn bench] fla not available: {type(e).__name__}: {e}")
    else:
        # keywords only: some fla versions put gk / gv between g and beta
        def fla_step(q, k, v, g, beta, S):
            o, _ = fla_recurrent(q=q[:, None], k=k[:, None], v=v[:, None], g=g[:, None], beta=beta[:, None],
                                 initial_state=S, output_final_state=True)
            return o
        backends["fla"] = {"chunk": lambda q, k, v, g, beta: fla_chunk(q=q, k=k, v=v, g=g, beta=beta)[0],
                           "step": fla_step}
    return backends


def attempt(label: str, fn: Callable[[], float]):
    """Run one measurement; a failure is recorded (and printed) as a string instead of a time."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - recorded and shown in the table
        msg = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        print(f"[gdn bench] {label}: {msg}")
        return f"error: {msg}"
    finally:
        torch.cuda.empty_cache()


def check_correctness(backends, device, T: int = 4096) -> dict:
    """Triton (and fla) forward vs the fp32 reference, and Triton gradients vs the reference."""
    from deepwish.kernels.gated_delta import chunk_gated_delta_rule_ref
    out = {}
    inputs = make_inputs(T, device)
    leaves_ref = [x.detach().clone().requires_grad_() for x in inputs]
    o_ref = chunk_gated_delta_rule_ref(*leaves_ref)[0]
    do = torch.randn_like(o_ref, dtype=torch.float32)
    grads_ref = torch.autograd.grad((o_ref.float() * do).sum(), leaves_ref)
    results = {}
    for name in [n for n in backends if n != "torch"]:
        leaves = [x.detach().clone().requires_grad_() for x in inputs]
        try:
            o = backends[name]["chunk"](*leaves)
        except Exception as e:  # noqa: BLE001
            out[f"{name} fwd"] = f"error: {type(e).__name__}: {e}"
            continue
        results[name] = o.detach()
        out[f"{name} o vs torch"] = rel_rms(o_ref.float(), o.float())
        try:
            grads = torch.autograd.grad((o.float() * do).sum(), leaves)
        except Exception as e:  # noqa: BLE001 - fla's backward refuses on some Triton versions
            out[f"{name} bwd"] = f"refused: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            continue
        for gname, a, b in zip(("dq", "dk", "dv", "dg", "dbeta"), grads_ref, grads):
            out[f"{name} {gname} vs torch"] = rel_rms(a.float(), b.float())
    if "fla" in results and "triton" in results:
        out["triton o vs fla"] = rel_rms(results["fla"].float(), results["triton"].float())
    # one decode step at batch 64 against the reference step (the state is updated in place)
    from deepwish.kernels.gated_delta import fused_recurrent_gated_delta_step, recurrent_gated_delta_step_ref
    q1, k1, v1, g1, beta1 = (x[:, -1] for x in make_inputs(1, device, batch=64))
    state = torch.randn(64, H, D, D, device=device)
    o1_ref, state_ref = recurrent_gated_delta_step_ref(q1, k1, v1, g1, beta1, state)
    o1 = fused_recurrent_gated_delta_step(q1, k1, v1, g1, beta1, state)
    out["triton decode o vs torch"] = rel_rms(o1_ref.float(), o1.float())
    out["triton decode state vs torch"] = rel_rms(state_ref, state)
    print(f"[gdn bench] correctness at B={B} T={T} H={H} K=V={D} bf16 (rel_rms):")
    for key, val in out.items():
        print(f"    {key:28s} {val if isinstance(val, str) else f'{val:.2e}'}")
    return out


def bench_chunk(backends, seqlens, device) -> dict:
    res: dict = {}
    for T in seqlens:
        inputs = make_inputs(T, device)
        for name, fns in backends.items():
            fwd_key, bwd_key = f"{name} fwd", f"{name} fwd+bwd"
            if name == "torch" and T > REF_MAX_T_FWD:
                continue
            res.setdefault(fwd_key, {})[T] = attempt(f"{fwd_key} T={T}", lambda: median_ms(
                lambda: fns["chunk"](*inputs)))
            if name == "torch" and T > REF_MAX_T_BWD:
                continue
            fwd_bwd = fwd_bwd_step(fns["chunk"], inputs)
            try:
                fwd_bwd()
            except Exception as e:  # noqa: BLE001 - e.g. fla's backward refusing on this Triton
                res.setdefault(bwd_key, {})[T] = f"refused: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
                print(f"[gdn bench] {bwd_key} T={T}: {res[bwd_key][T]}")
                continue
            res.setdefault(bwd_key, {})[T] = attempt(f"{bwd_key} T={T}", lambda: median_ms(fwd_bwd))
            del fwd_bwd
        del inputs
        # causal softmax attention at the same shapes
        q, k, v = (torch.randn(B, H, T, D, device=device, dtype=torch.bfloat16) for _ in range(3))
        res.setdefault("sdpa fwd", {})[T] = attempt(f"sdpa fwd T={T}", lambda: median_ms(
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)))
        leaves = [x.requires_grad_() for x in (q, k, v)]
        do = torch.randn_like(q)

        def sdpa_fwd_bwd():
            F.scaled_dot_product_attention(*leaves, is_causal=True).backward(do)
        res.setdefault("sdpa fwd+bwd", {})[T] = attempt(f"sdpa fwd+bwd T={T}", lambda: median_ms(
            sdpa_fwd_bwd, grad_to_none=leaves))
        del q, k, v, leaves, do
    return res


def bench_decode(backends, device) -> dict:
    from deepwish.kernels.gated_delta.reference import l2norm
    res: dict = {}
    for batch in DECODE_BATCHES:
        q = l2norm(torch.randn(batch, H, D, device=device)).bfloat16()
        k = l2norm(torch.randn(batch, H, D, device=device)).bfloat16()
        v = torch.randn(batch, H, D, device=device, dtype=torch.bfloat16)
        g = F.logsigmoid(torch.randn(batch, H, device=device))
        beta = torch.sigmoid(torch.randn(batch, H, device=device))
        for name, fns in backends.items():
            state = torch.randn(batch, H, D, D, device=device) * 0.01
            res.setdefault(f"{name} decode", {})[batch] = attempt(f"{name} decode B={batch}", lambda: median_ms(
                lambda: fns["step"](q, k, v, g, beta, state)))
    return res


def environment(device) -> dict:
    try:
        import fla
        fla_version = getattr(fla, "__version__", "unknown")
    except Exception:  # noqa: BLE001 - any import failure means fla is not there
        fla_version = None
    return bench_environment(device, "deepwish bench gdn", fla=fla_version)


def fmt(val, digits=3) -> str:
    if isinstance(val, str):
        return val.split(":")[0]
    return f"{val:.{digits}f}"


def print_table(chunk: dict, decode: dict, seqlens, peak_tflops: float = MATMUL_PEAK_TFLOPS,
                copy_gbs: float = COPY_PEAK_GBS) -> None:
    print(f"\nchunked, B={B} H={H} K=V={D} bf16: ms (model TFLOP/s, % of {peak_tflops:.0f})")
    print(f"{'':22s}" + "".join(f"{'T=' + str(T):>22s}" for T in seqlens))
    for key, row in chunk.items():
        cells = []
        for T in seqlens:
            val = row.get(T)
            if val is None:
                cells.append(f"{'-':>22s}")
                continue
            if isinstance(val, str):
                cells.append(f"{fmt(val):>22s}")
                continue
            flops = attn_fwd_flops(T) if key.startswith("sdpa") else gdn_fwd_flops(T)
            flops *= (3.5 if key.startswith("sdpa") else 3.0) if key.endswith("fwd+bwd") else 1.0
            tf = flops / (val * 1e-3) / 1e12
            cells.append(f"{val:9.3f} ({tf:5.0f},{100 * tf / peak_tflops:3.0f}%)".rjust(22))
        print(f"{key:22s}" + "".join(cells))
    print(f"\ndecode step, H={H} K=V={D}, fp32 state: us (GB/s, % of {copy_gbs:.0f} copy)")
    print(f"{'':22s}" + "".join(f"{'B=' + str(b):>22s}" for b in DECODE_BATCHES))
    for key, row in decode.items():
        cells = []
        for b in DECODE_BATCHES:
            val = row.get(b)
            if isinstance(val, (int, float)):
                gbs = decode_bytes(b) / (val * 1e-3) / 1e9
                cells.append(f"{val * 1e3:9.1f} ({gbs:5.0f},{100 * gbs / copy_gbs:3.0f}%)".rjust(22))
            else:
                cells.append(f"{fmt(val) if val else '-':>22s}")
        print(f"{key:22s}" + "".join(cells))


def plot(chunk: dict, decode: dict, seqlens, path: str, copy_gbs: float = COPY_PEAK_GBS) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    for key, row in chunk.items():
        xs = [T for T in seqlens if isinstance(row.get(T), (int, float))]
        if xs:
            ax1.plot(xs, [row[T] for T in xs], marker="o", linestyle="--" if "fwd+bwd" in key else "-", label=key)
    ax1.set_xscale("log", base=2)
    ax1.set_yscale("log")
    ax1.set_xlabel("sequence length T")
    ax1.set_ylabel("ms (median)")
    ax1.set_title(f"gated delta rule vs causal attention, B={B} H={H} D={D} bf16")
    ax1.legend(fontsize=8)
    ax1.grid(True, which="both", alpha=0.3)
    for key, row in decode.items():
        xs = [b for b in DECODE_BATCHES if isinstance(row.get(b), (int, float))]
        if xs:
            ax2.plot(xs, [decode_bytes(b) / (row[b] * 1e-3) / 1e9 for b in xs], marker="o", label=key)
    ax2.axhline(copy_gbs, color="k", linestyle=":", label=f"device copy {copy_gbs:.0f} GB/s")
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("batch")
    ax2.set_ylabel("GB/s (state read + write)")
    ax2.set_title(f"one decode step, fp32 state {H}x{D}x{D}")
    ax2.legend(fontsize=8)
    ax2.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def profile_forward(backends, T: int, device) -> dict:
    """The chunked forward's kernels at T by GPU time, for every backend but the torch reference;
    and ours forward + backward ("<name> fwd+bwd"), whose backward kernels are the rest."""
    inputs = make_inputs(T, device)
    out = {}
    for name in [n for n in backends if n != "torch"]:
        out[name] = attempt(f"profile {name} T={T}", lambda: kernel_times(lambda: backends[name]["chunk"](*inputs)))
        if name == "triton":
            out[f"{name} fwd+bwd"] = attempt(f"profile {name} fwd+bwd T={T}",
                                             lambda: kernel_times(fwd_bwd_step(backends[name]["chunk"], inputs), rows=16))
    for name, prof in out.items():
        if isinstance(prof, dict):
            print(f"[gdn bench] {name if name.endswith('bwd') else name + ' fwd'} at T={T}: "
                  f"{prof['sum_ms']:.3f} ms of kernels")
            for r in prof["kernels"]:
                print(f"    {r['us_per_step']:9.1f} us  x{r['calls_per_step']:.0f}  {r['name']}")
    return out


def compare_with_file(path: str, seqlens, device, rounds: int = 3) -> dict:
    """Ours forward and forward + backward against another version of kernels/gated_delta/triton.py
    (a file: `git show REV:deepwish/kernels/gated_delta/triton.py > old.py`), alternating `rounds`
    times in this process at each T: a change's ratio measured side by side on one GPU. The output's
    and the five gradients' relative difference from the other version's says they compute the same."""
    import importlib.util
    from deepwish.kernels.gated_delta import triton as ours
    if not os.path.isfile(path):
        raise FileNotFoundError(f"gdn bench --against: no kernel file at {path!r}")
    spec = importlib.util.spec_from_file_location("gated_delta_other", path)
    other = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(other)
    versions = {"other": other, "ours": ours}
    out: dict = {"against": path, "rows": []}
    for T in seqlens:
        inputs = make_inputs(T, device)
        do = torch.randn_like(inputs[2])
        fwd = {name: (lambda m=mod: m.chunk_gated_delta_rule(*inputs)[0]) for name, mod in versions.items()}
        fwd_bwd = {name: fwd_bwd_step(lambda *x, m=mod: m.chunk_gated_delta_rule(*x)[0], inputs, do)
                   for name, mod in versions.items()}
        row = {"T": T, "rel_diff": [rel_rms(a.float(), b.float()) for a, b in zip(fwd_bwd["other"](), fwd_bwd["ours"]())],
               "fwd_ms": {"other": [], "ours": []}, "fwd_bwd_ms": {"other": [], "ours": []}}
        for _ in range(rounds):
            for name in ("other", "ours"):
                row["fwd_ms"][name].append(median_ms(fwd[name]))
                row["fwd_bwd_ms"][name].append(median_ms(fwd_bwd[name]))
        ms = lambda key, name: " / ".join(f"{x:.3f}" for x in row[key][name])  # noqa: E731
        print(f"[gdn bench] T={T} against {path} (ms, alternating): fwd {ms('fwd_ms', 'other')} -> "
              f"{ms('fwd_ms', 'ours')}; fwd+bwd {ms('fwd_bwd_ms', 'other')} -> {ms('fwd_bwd_ms', 'ours')}; "
              f"o and gradients' difference {max(row['rel_diff']):.1e}")
        out["rows"].append(row)
    return out


def chosen_tiles() -> dict[str, str]:
    """Each autotuned gated-delta kernel's pick (its last tuned key; autotuning keys leave T out), and
    `_wy_bwd_kernel`'s fixed K slice and warps."""
    from deepwish.kernels.gated_delta import triton as kernels
    out = {}
    for name in ("_wy_inverse_tuned", "_wy_apply_tuned", "_state_fwd_tuned", "_output_fwd_tuned",
                 "_dv_local_tuned", "_state_bwd_tuned", "_chunk_bwd_wy_tuned", "_chunk_bwd_qk_tuned"):
        config = getattr(getattr(kernels, name), "best_config", None)
        if config is not None:
            out[name.strip("_").removesuffix("_tuned")] = (f"{config.kwargs} w{config.num_warps} "
                                                            f"s{config.num_stages}")
    out["wy_bwd"] = f"{{'BKS': {kernels.WY_BWD_BKS}}} w{kernels.WY_BWD_WARPS} (fixed: it accumulates in place)"
    return out


def run(out_dir: str, seqlens=(4096, 8192, 16384, 32768, 65536), device="cuda", profile_T: int = 65536) -> dict:
    """Check, time, print, and write `gdn.json` and `gdn.png` into out_dir. Returns the results."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError("gdn bench: needs a CUDA device (timings use triton.testing.do_bench)")
    os.makedirs(out_dir, exist_ok=True)
    seqlens = tuple(int(T) for T in seqlens)
    backends = load_backends()
    env = environment(device)
    print(f"[gdn bench] {env}")
    correctness = check_correctness(backends, device)
    chunk = bench_chunk(backends, seqlens, device)
    decode = bench_decode(backends, device)
    flops, copy = ceilings()
    peak_tflops, copy_gbs = flops / 1e12, copy / 1e9
    print_table(chunk, decode, seqlens, peak_tflops, copy_gbs)
    profile = profile_forward(backends, profile_T, device) if profile_T > 0 else {}
    tiles = chosen_tiles()
    print("[gdn bench] autotuned tiles (the last shape tuned): " + ", ".join(f"{k} {v}" for k, v in tiles.items()))
    results = {"environment": env, "shapes": {"B": B, "H": H, "HV": H, "K": D, "V": D, "dtype": "bfloat16",
                                              "decode_batches": list(DECODE_BATCHES)},
               "correctness_rel_rms": correctness,
               "chunk_ms": {k: {str(T): v for T, v in row.items()} for k, row in chunk.items()},
               "decode_ms": {k: {str(b): v for b, v in row.items()} for k, row in decode.items()},
               "peaks": {"copy_GBps": copy_gbs, "bf16_matmul_TFLOPs": peak_tflops},
               "forward_kernels": {"T": profile_T, **profile}, "tiles": tiles}
    with open(os.path.join(out_dir, "gdn.json"), "w") as f:
        json.dump(results, f, indent=2)
    plot(chunk, decode, seqlens, os.path.join(out_dir, "gdn.png"), copy_gbs)
    print(f"[gdn bench] wrote {os.path.join(out_dir, 'gdn.json')} and gdn.png")
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=doc_summary(__doc__))
    p.add_argument("--out", required=True, help="directory for gdn.json and gdn.png")
    p.add_argument("--seqlens", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536])
    p.add_argument("--device", default="cuda")
    p.add_argument("--profile-T", type=int, default=65536, help="the forward's kernels of ours and fla's at this T (0: off)")
    p.add_argument("--against", metavar="FILE", help="only time ours against this other version of "
                   "kernels/gated_delta/triton.py, alternating, at --seqlens (writes gdn_against.json)")
    args = p.parse_args(argv)
    if args.against:
        os.makedirs(args.out, exist_ok=True)
        res = {"environment": environment(torch.device(args.device)),
               **compare_with_file(args.against, args.seqlens, torch.device(args.device))}
        with open(os.path.join(args.out, "gdn_against.json"), "w") as f:
            json.dump(res, f, indent=2)
        return
    run(args.out, seqlens=args.seqlens, device=args.device, profile_T=args.profile_T)


if __name__ == "__main__":
    main()
