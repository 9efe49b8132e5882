"""Plain-causal attention as qwen3_0.6b's training step calls it (16 / 8 heads, D 128, bf16; q, k, v
[B, T, H, D] transposed to [B, H, T, D]): forward and forward + backward under each SDPA backend and
the own kernel, eager calls, median of 30. Writes $OUT/attn_plain_backends.json (reports/attention.md
run 11: `OUT=DIR python reports/attention/plain_backends.py` on a CUDA machine)."""
import json
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

def bench(fn, reps=30):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(reps):
        st.record(); fn(); en.record(); torch.cuda.synchronize(); ts.append(st.elapsed_time(en))
    ts.sort()
    return ts[len(ts) // 2]

def main():
    torch.manual_seed(0)
    dev = "cuda"
    rows = []
    for (B, T) in ((8, 2048), (2, 8192)):
        H, Hkv, D = 16, 8, 128
        q = torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(B, T, Hkv, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(B, T, Hkv, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
        do = torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16)
        ref = None
        def sdpa_gqa(backend=None, expand=False):
            def f():
                qq, kk, vv = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
                if expand:
                    kk, vv = kk.repeat_interleave(2, 1), vv.repeat_interleave(2, 1)
                if backend is None:
                    o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=not expand)
                else:
                    with sdpa_kernel(backend):
                        o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=not expand)
                return o.transpose(1, 2)
            return f
        def own():
            from deepwish.kernels.attention import flash_attention
            return flash_attention(q, k, v)
        variants = {"sdpa default gqa": sdpa_gqa(), "sdpa default expanded": sdpa_gqa(expand=True),
                    "flash gqa": sdpa_gqa(SDPBackend.FLASH_ATTENTION),
                    "cudnn gqa": sdpa_gqa(SDPBackend.CUDNN_ATTENTION),
                    "cudnn expanded": sdpa_gqa(SDPBackend.CUDNN_ATTENTION, expand=True),
                    "efficient gqa": sdpa_gqa(SDPBackend.EFFICIENT_ATTENTION),
                    "own": own}
        flops_f = 4 * B * H * D * T * (T + 1) / 2
        for name, f in variants.items():
            try:
                o = f()
                o.backward(do)
                g = [t.grad.clone() for t in (q, k, v)]
                for t in (q, k, v): t.grad = None
                if ref is None:
                    ref = (o.detach().float(), [x.float() for x in g])
                err = max([((o.detach().float() - ref[0]).norm() / ref[0].norm()).item()] +
                          [((a.float() - b).norm() / b.norm()).item() for a, b in zip(g, ref[1])])
                tf = bench(lambda: f())
                def fb():
                    o = f(); o.backward(do)
                tfb = bench(fb)
                for t in (q, k, v): t.grad = None
                r = dict(B=B, T=T, variant=name, fwd_ms=tf, fwdbwd_ms=tfb, fwd_tflops=flops_f / tf / 1e9,
                         fwdbwd_tflops=3.5 * flops_f / tfb / 1e9, rel_err_vs_first=err)
            except Exception as e:
                r = dict(B=B, T=T, variant=name, error=f"{type(e).__name__}: {str(e)[:200]}")
            rows.append(r)
            print(json.dumps(r), flush=True)
    out = os.environ.get("OUT", "/tmp")
    json.dump(rows, open(os.path.join(out, "attn_plain_backends.json"), "w"), indent=1)

if __name__ == "__main__":
    main()
