"""Benchmark: short causal conv and fused linear cross-entropy on one GPU.

Conv (B=1, D=4096, W=4, SiLU, bf16), T in 1k..64k: forward and forward+backward of the Triton
kernels vs the torch reference (fp32 conv1d), torch.compile of it, and HF's bf16 conv1d path, as time and as effective
bandwidth over the minimal bytes (fwd: read x, write y; bwd: read x, dy, write dx), against the
measured 2973 GB/s copy bandwidth of the H100. Also sweeps a few tile shapes at T=16k.

LCE (D=1024, V=151936, bf16, mean), N in 2k..32k: forward+backward time and peak extra memory
(max_memory_allocated over the inputs) for ours, the plain torch loss, torch.compile of it,
and Liger-Kernel's fused linear cross-entropy when `import liger_kernel` works.

    python -m deepwish.bench.kernels_conv_lce --out reports/kernels_conv_lce
writes results.json, conv.png and lce.png there and prints a table last.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

from deepwish.bench.env import H100_COPY_BW, copy_bw, doc_summary
from deepwish.bench.timing import graph_ms, kernel_times, median_ms

H100_COPY_GBPS = H100_COPY_BW / 1e9  # the ceiling of results written before it was recorded with them
CONV_T = (1024, 4096, 16384, 32768, 65536)
CONV_D, CONV_W = 4096, 4
LCE_N = (2048, 4096, 8192, 16384, 32768)
LCE_D, LCE_V = 1024, 151936


def _try(fn):
    """Run fn; on failure (e.g. out of memory) return the error as a short string."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - a baseline that cannot run is reported, not fatal
        torch.cuda.empty_cache()
        return f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"


# ----------------------------------------------------------------------------- conv

def _hf_style_conv(x, w):
    """What HF's torch fallback runs: bf16 depthwise conv1d, left padding W-1, truncate, SiLU."""
    T = x.shape[1]
    y = F.conv1d(x.transpose(1, 2), w[:, None, :], padding=w.shape[1] - 1, groups=x.shape[2])[..., :T]
    return F.silu(y).transpose(1, 2), None


def _conv_case(T: int, device: str, compiled_ref) -> dict:
    from deepwish.kernels.short_conv import reference as conv_ref
    from deepwish.kernels.short_conv import triton as conv_tri
    x = torch.randn(1, T, CONV_D, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(CONV_D, CONV_W, device=device) * 0.5).to(torch.bfloat16).requires_grad_()
    dy = torch.randn_like(x)
    elem = T * CONV_D
    fwd_bytes = 2 * elem * 2
    fwdbwd_bytes = 5 * elem * 2
    row = {"T": T}
    impls = {"ours": conv_tri.causal_conv1d, "torch_ref": conv_ref.causal_conv1d,
             "torch_hf_bf16": _hf_style_conv}
    if compiled_ref is not None:
        impls["compiled_ref"] = compiled_ref
    for name, fn in impls.items():
        def fwd():
            with torch.no_grad():
                return fn(x, w)[0]

        def fwdbwd():
            y = fn(x, w)[0]
            return torch.autograd.grad(y, [x, w], dy)

        t_f = _try(lambda: median_ms(fwd))
        t_fb = _try(lambda: median_ms(fwdbwd))
        row[name] = {"fwd_ms": t_f, "fwdbwd_ms": t_fb}
        if isinstance(t_f, float):
            row[name]["fwd_GBps"] = fwd_bytes / t_f / 1e6
        if isinstance(t_fb, float):
            row[name]["fwdbwd_GBps"] = fwdbwd_bytes / t_fb / 1e6
        if name == "ours":  # the same step replayed as one CUDA graph: the GPU's time without the host's
            # launches and autograd (at T 16k the eager step's kernels take less than its timed span)
            t_g = _try(lambda: graph_ms(fwdbwd))
            row[name]["fwdbwd_graph_ms"] = t_g
            if isinstance(t_g, float):
                row[name]["fwdbwd_graph_GBps"] = fwdbwd_bytes / t_g / 1e6
    return row


def _conv_tile_sweep(device: str, T: int = 16384) -> dict:
    """Time the kernels alone for a few tile shapes (forward and backward separately)."""
    from deepwish.kernels.short_conv import triton as conv_tri
    x = torch.randn(1, T, CONV_D, device=device, dtype=torch.bfloat16)
    w = (torch.randn(CONV_D, CONV_W, device=device) * 0.5).to(torch.bfloat16)
    x2, cu, doc_idx, doc_start = conv_tri.pack_documents(x, None)  # batched: no doc arrays
    dy2 = torch.randn_like(x2)
    elem = T * CONV_D
    out = {"T": T, "fwd": [], "bwd": []}
    for bt, bd, nw in ((16, 128, 4), (32, 128, 4), (8, 256, 4), (16, 256, 8), (32, 64, 4), (64, 32, 4)):
        ms = _try(lambda: median_ms(lambda: conv_tri.conv_forward(x2, w, None, None, doc_idx, doc_start, T, True,
                                                              block_t=bt, block_d=bd, num_warps=nw)))
        out["fwd"].append({"block_t": bt, "block_d": bd, "num_warps": nw, "ms": ms,
                           "GBps": 4 * elem / ms / 1e6 if isinstance(ms, float) else None})
    for bd, nw, progs, regs in ((512, 4, 2048, 128), (512, 4, 2048, None), (512, 4, 1024, 128),
                                (512, 4, 4096, 128), (256, 2, 2048, 128), (1024, 8, 2048, 128),
                                (128, 1, 4096, None)):
        ms = _try(lambda: median_ms(lambda: conv_tri.conv_backward(dy2, x2, w, None, None, doc_idx, doc_start, cu, T,
                                                               True, block_d=bd, num_warps=nw,
                                                               target_programs=progs, max_registers=regs)))
        out["bwd"].append({"block_d": bd, "num_warps": nw, "target_programs": progs, "max_registers": regs,
                           "ms": ms,
                           "GBps": 6 * elem / ms / 1e6 if isinstance(ms, float) else None})
    return out


def _conv_profile(device: str, T: int = 16384, iters: int = 10) -> dict:
    """Device time per forward+backward step of ours, by kernel (torch.profiler), to tell GPU
    work from idle gaps between the kernels (compare the sum with the timed fwdbwd_ms)."""
    from deepwish.kernels.short_conv import triton as conv_tri
    x = torch.randn(1, T, CONV_D, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(CONV_D, CONV_W, device=device) * 0.5).to(torch.bfloat16).requires_grad_()
    dy = torch.randn_like(x)
    return {"T": T, **kernel_times(lambda: torch.autograd.grad(conv_tri.causal_conv1d(x, w)[0], [x, w], dy), iters)}


# ----------------------------------------------------------------------------- LCE

def _plain_lce(h, w, t):
    return F.cross_entropy((h @ w.t()).float(), t, reduction="mean")


def _lce_case(N: int, device: str, impls: dict) -> dict:
    h = torch.randn(N, LCE_D, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(LCE_V, LCE_D, device=device) * LCE_D ** -0.5 * 2).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, LCE_V, (N,), device=device)
    t[::17] = -100
    row = {"N": N, "plain_logits_GB": N * LCE_V * 2 / 1e9}
    ref_loss = None
    for name, fn in impls.items():
        def step():
            loss = fn(h, w, t)
            return loss, torch.autograd.grad(loss, [h, w])

        def measure():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            loss, _ = step()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 1e9
            return float(loss.detach()), peak

        got = _try(measure)
        if isinstance(got, str):
            row[name] = {"error": got}
            continue
        loss, peak = got
        ms = _try(lambda: median_ms(step))
        ref_loss = loss if ref_loss is None else ref_loss
        grads_gb = (h.numel() + w.numel()) * 2 / 1e9
        row[name] = {"fwdbwd_ms": ms, "peak_GB": peak, "peak_minus_grads_GB": peak - grads_gb,
                     "loss": loss, "loss_minus_first": loss - ref_loss}
    return row


def _first(out):
    """Some Liger versions return (loss, z_loss)."""
    return out[0] if isinstance(out, tuple) else out


def _lce_impls(with_compile: bool) -> tuple[dict, dict]:
    from deepwish.kernels.linear_cross_entropy import triton as lce_tri
    notes = {}
    impls = {
        "ours": lambda h, w, t: lce_tri.linear_cross_entropy(h, w, t, reduction="mean"),
        "ours_fp32_logits": lambda h, w, t: lce_tri.linear_cross_entropy(h, w, t, reduction="mean",
                                                                         logits_dtype=torch.float32),
        # Asking for logprobs takes the other path: lse saved, logits recomputed in the backward.
        "ours_recompute": lambda h, w, t: lce_tri.linear_cross_entropy(h, w, t, reduction="mean",
                                                                       return_logprobs=True)[0],
        "torch_plain": _plain_lce,
    }
    if with_compile:
        impls["torch_compile"] = torch.compile(_plain_lce, dynamic=False)
    try:
        import liger_kernel  # noqa: F401
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        liger = LigerFusedLinearCrossEntropyLoss(reduction="mean")
        impls["liger"] = lambda h, w, t: _first(liger(w, h, t))
        notes["liger"] = getattr(liger_kernel, "__version__", "installed")
    except Exception as e:  # noqa: BLE001
        notes["liger"] = f"not available ({type(e).__name__}: {e})"
    return impls, notes


# ----------------------------------------------------------------------------- report

def _environment(device: str) -> dict:
    from deepwish.bench.env import bench_environment
    return bench_environment(device, "deepwish bench kernels", copy_GBps_ceiling=copy_bw() / 1e9)


def _fmt(v, spec=".3f"):
    return format(v, spec) if isinstance(v, float) else ("-" if v is None else "err")


def _plot(results: dict, out_dir: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    conv = results.get("conv", [])
    copy = results.get("env", {}).get("copy_GBps_ceiling", H100_COPY_GBPS)
    if conv:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, key in zip(axes, ("fwd_GBps", "fwdbwd_GBps")):
            for name in ("ours", "torch_hf_bf16", "torch_ref", "compiled_ref"):
                pts = [(r["T"], r[name].get(key)) for r in conv if name in r and isinstance(r[name].get(key), float)]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=name)
            ax.axhline(copy, color="k", ls="--", lw=0.8, label=f"copy {copy:.0f} GB/s")
            ax.axhline(0.6 * copy, color="gray", ls=":", lw=0.8, label="60% target")
            ax.set_xscale("log", base=2)
            ax.set_xlabel(f"T (B=1, D={CONV_D}, bf16)")
            ax.set_ylabel("GB/s over minimal bytes")
            ax.set_title(f"short conv {key.split('_')[0]}")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "conv.png"), dpi=120)
        plt.close(fig)
    lce = results.get("lce", [])
    if lce:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        names = sorted({k for r in lce for k, v in r.items() if isinstance(v, dict)})
        for name in names:
            t_pts = [(r["N"], r[name]["fwdbwd_ms"]) for r in lce
                     if isinstance(r.get(name), dict) and isinstance(r[name].get("fwdbwd_ms"), float)]
            m_pts = [(r["N"], r[name]["peak_GB"]) for r in lce
                     if isinstance(r.get(name), dict) and isinstance(r[name].get("peak_GB"), float)]
            if t_pts:
                axes[0].plot(*zip(*t_pts), marker="o", label=name)
            if m_pts:
                axes[1].plot(*zip(*m_pts), marker="o", label=name)
        for ax, lab in zip(axes, ("fwd+bwd ms", "peak extra memory GB")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(f"N tokens (D={LCE_D}, V={LCE_V}, bf16)")
            ax.set_ylabel(lab)
            ax.legend(fontsize=7)
        axes[0].set_title("linear cross-entropy time")
        axes[1].set_title("linear cross-entropy memory")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "lce.png"), dpi=120)
        plt.close(fig)


def _print_table(results: dict) -> None:
    copy = results.get("env", {}).get("copy_GBps_ceiling", H100_COPY_GBPS)
    print(f"\n== short conv (B=1, D={CONV_D}, W={CONV_W}, bf16): ms and GB/s over minimal bytes; "
          f"copy = {copy:.0f} GB/s ==")
    print(f"{'T':>6} | {'impl':<13} | {'fwd ms':>8} {'GB/s':>7} {'%copy':>6} | {'f+b ms':>8} {'GB/s':>7} {'%copy':>6}")
    for r in results.get("conv", []):
        for name in ("ours", "torch_hf_bf16", "torch_ref", "compiled_ref"):
            if name not in r:
                continue
            v = r[name]
            gf, gb = v.get("fwd_GBps"), v.get("fwdbwd_GBps")
            print(f"{r['T']:>6} | {name:<13} | {_fmt(v['fwd_ms']):>8} {_fmt(gf, '.0f'):>7} "
                  f"{_fmt(gf / copy * 100 if gf else None, '.0f'):>6} | {_fmt(v['fwdbwd_ms']):>8} "
                  f"{_fmt(gb, '.0f'):>7} {_fmt(gb / copy * 100 if gb else None, '.0f'):>6}")
            if "fwdbwd_graph_ms" in v:
                gg = v.get("fwdbwd_graph_GBps")
                print(f"{'':>6} | {'  as a graph':<13} | {'':>8} {'':>7} {'':>6} | {_fmt(v['fwdbwd_graph_ms']):>8} "
                      f"{_fmt(gg, '.0f'):>7} {_fmt(gg / copy * 100 if gg else None, '.0f'):>6}")
    sweep = results.get("conv_tiles")
    if sweep:
        print(f"\n-- conv tile sweep at T={sweep['T']} (kernel only) --")
        for kind in ("fwd", "bwd"):
            for c in sweep[kind]:
                shape = (f"BT={c['block_t']:>3}" if "block_t" in c
                         else f"progs={c['target_programs']} maxreg={c['max_registers']}")
                print(f"{kind} {shape} BD={c['block_d']:>4} warps={c['num_warps']} : "
                      f"{_fmt(c['ms'])} ms {_fmt(c['GBps'], '.0f')} GB/s")
    prof = results.get("conv_profile")
    if isinstance(prof, dict):
        print(f"\n-- conv fwd+bwd device time per step at T={prof['T']}: {prof['sum_ms']:.3f} ms in kernels --")
        for r in prof["kernels"]:
            print(f"{r['us_per_step']:9.1f} us  x{r['calls_per_step']:.0f}  {r['name']}")
    elif prof is not None:
        print(f"\n-- conv profile failed: {prof} --")
    print(f"\n== linear cross-entropy (D={LCE_D}, V={LCE_V}, bf16, mean): fwd+bwd ms | peak extra GB "
          f"(incl. the bf16 grads of h and W) | loss - first ==")
    for r in results.get("lce", []):
        for name, v in r.items():
            if not isinstance(v, dict):
                continue
            if "error" in v:
                print(f"{r['N']:>6} | {name:<17} | {v['error']}")
                continue
            print(f"{r['N']:>6} | {name:<17} | {_fmt(v['fwdbwd_ms'], '.2f'):>8} ms | "
                  f"{_fmt(v['peak_GB'], '.3f'):>7} GB | {v['loss_minus_first']:+.2e}")
    if "notes" in results:
        print("notes:", results["notes"])


def run(out_dir: str, device: str = "cuda", conv: bool = True, lce: bool = True,
        with_compile: bool = True) -> dict:
    """Time everything, write results.json + conv.png + lce.png into out_dir, print a table."""
    if not torch.cuda.is_available():
        raise RuntimeError("kernels_conv_lce benchmark needs a CUDA GPU")
    os.makedirs(out_dir, exist_ok=True)
    results = {"env": _environment(device), "notes": {}}
    if with_compile:
        # One compiled graph per shape (dynamic=False) and per grad mode: raise dynamo's recompile
        # limit (default 8) so later shapes are not silently run eagerly.
        import torch._dynamo.config as dynamo_config
        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))
    t0 = time.time()
    if conv:
        from deepwish.kernels.short_conv import reference as conv_ref
        compiled = torch.compile(conv_ref.causal_conv1d, dynamic=False) if with_compile else None
        results["conv"] = []
        for T in CONV_T:
            results["conv"].append(_conv_case(T, device, compiled))
            print(f"[conv] T={T} done ({time.time() - t0:.0f}s)", flush=True)
        results["conv_tiles"] = _conv_tile_sweep(device)
        results["conv_profile"] = _try(lambda: _conv_profile(device))
    if lce:
        impls, notes = _lce_impls(with_compile)
        results["notes"].update(notes)
        results["lce"] = []
        for N in LCE_N:
            results["lce"].append(_lce_case(N, device, impls))
            print(f"[lce] N={N} done ({time.time() - t0:.0f}s)", flush=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    _plot(results, out_dir)
    _print_table(results)
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=doc_summary(__doc__))
    p.add_argument("--out", required=True, help="output folder for results.json and plots")
    p.add_argument("--device", default="cuda")
    p.add_argument("--only", choices=("conv", "lce"), default=None, help="run one half only")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    a = p.parse_args(argv)
    run(a.out, a.device, conv=a.only in (None, "conv"), lce=a.only in (None, "lce"),
        with_compile=not a.no_compile)


if __name__ == "__main__":
    main()
