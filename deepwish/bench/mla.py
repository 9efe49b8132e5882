"""MLA on one GPU: which SDPA kernel the naive path should use, and what the absorbed decode costs.

    python -m deepwish.bench.mla [--batch 4 --seq 2048]      (CUDA only; prints a table)

1. Training attention at the deepseek_v3_bench shape (16 heads, q/k 192, v 128, causal, bf16),
   forward + backward of `F.scaled_dot_product_attention`:
     v128-default   v at its own width, kernel chosen by torch (flash refuses unequal head dims)
     v128-efficient the memory-efficient kernel forced
     v192-flash     v zero-padded to 192 and the flash kernel forced (what model/mla.py does)
2. One MLA layer forward + backward (the module as the trainer runs it).
3. Decode, batch 64, cache 4096: the weight-absorbed step over the latent cache (what
   `MLA.forward` runs with a cache) against expanding the cached latent to per-head K/V every
   step (what a naive cached decode would do), with the cache bytes each reads.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from deepwish.bench.env import doc_summary
from deepwish.config import load_config
from deepwish.model.mla import MLA
from deepwish.model.rope import Rotary
from deepwish.model.transformer import ForwardContext


def timed(fn, iters: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of fn() on the current CUDA stream."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) * 1e3)
    return sorted(out)[len(out) // 2]


def sdpa_cases(B: int, T: int, H: int, dqk: int, dv: int, dev) -> list[tuple[str, float | str]]:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q = torch.randn(B, H, T, dqk, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn_like(q, requires_grad=True)
    v = torch.randn(B, H, T, dv, device=dev, dtype=torch.bfloat16, requires_grad=True)
    rows = []
    for name, backend, pad in (("v128-default", None, False), ("v128-efficient", SDPBackend.EFFICIENT_ATTENTION, False),
                               ("v192-flash", SDPBackend.FLASH_ATTENTION, True)):
        def step():
            vv = F.pad(v, (0, dqk - dv)) if pad else v
            o = F.scaled_dot_product_attention(q, k, vv, is_causal=True)
            o[..., :dv].sum().backward()
        try:
            if backend is None:
                rows.append((f"sdpa {name} fwd+bwd", timed(step)))
            else:
                with sdpa_kernel(backend):
                    rows.append((f"sdpa {name} fwd+bwd", timed(step)))
        except RuntimeError as e:
            rows.append((f"sdpa {name} fwd+bwd", f"refused: {str(e).splitlines()[0][:60]}"))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=doc_summary(__doc__))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("deepwish.bench.mla needs a CUDA GPU")
    dev = torch.device("cuda")
    cfg = load_config("deepseek_v3_bench").model
    H, dqk, dv = cfg.n_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    rows = sdpa_cases(a.batch, a.seq, H, dqk, dv, dev)

    mla = MLA(cfg, 0).to(dev)
    rot = Rotary(cfg, cfg.qk_rope_head_dim).to(dev)

    def ctx_for(pos):
        cos, sin = rot(pos)
        return ForwardContext(positions=pos, cos=cos, sin=sin)
    x = torch.randn(a.batch, a.seq, cfg.d_model, device=dev, requires_grad=True)
    ctx = ctx_for(torch.arange(a.seq, device=dev).expand(a.batch, -1))

    def layer():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, _ = mla(x, ctx)
        y.float().sum().backward()
    rows.append((f"MLA layer fwd+bwd (B{a.batch} T{a.seq}, autocast bf16)", timed(layer)))

    Bd, L = 64, 4096
    m16 = MLA(cfg, 0).to(dev, torch.bfloat16).eval()
    cache = m16.make_cache(Bd, L, torch.bfloat16, dev)
    cache.c_kv.normal_()
    cache.k_pe.normal_()
    xd = torch.randn(Bd, 1, cfg.d_model, device=dev, dtype=torch.bfloat16)
    cd = ctx_for(torch.full((Bd, 1), L - 1, device=dev))

    @torch.no_grad()
    def absorbed():
        m16(xd, cd, cache)

    @torch.no_grad()
    def expanded():
        q_nope, q_pe, c_kv, k_pe, _ = m16.project(xd, cd)
        c_all, pe_all = cache.update(cd.positions, c_kv, k_pe)
        o = m16.attend_naive(q_nope, q_pe, c_all, pe_all, None, causal=False)
        m16.o_proj(o.reshape(Bd, 1, -1))
    lat = cache.c_kv.numel() * 2 + cache.k_pe.numel() * 2
    full = Bd * L * H * (dqk + dv) * 2
    rows.append((f"decode B{Bd} cache {L}: absorbed (reads {lat / 2**20:.0f} MiB latent)", timed(absorbed)))
    rows.append((f"decode B{Bd} cache {L}: expand per step (builds {full / 2**20:.0f} MiB K/V)", timed(expanded)))

    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | shape deepseek_v3_bench")
    print("| case | ms |\n|---|---:|")
    for name, v in rows:
        print(f"| {name} | {v if isinstance(v, str) else f'{v:.3f}'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
