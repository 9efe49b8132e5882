"""DeepSeek-V3.2 sparse attention (DSA) at speed: the model side of the fast path against the dense
reference (model.dsa_backend=torch).

    deepwish bench dsa --out DIR [--index-seq 4096,16384,65536] [--train-seq 4096,16384,32768]
                                 [--decode-ctx 8192,32768,65536,131072] [--layers 2]
    deepwish bench dsa --out DIR --tiny          (toy shapes; runs on the CPU too)
    deepwish bench dsa --out DIR --parts kernel [--sweep] [--tiles DIR/tiles.json]

0. (--parts kernel, CUDA only) the sparse MLA kernel alone (bench/sparse_mla.py): fwd/bwd time
   and TFLOP/s at T 4k-64k and the goal shape against dense SDPA over the latent, decode
   latency at 4k-128k, a bf16 check against the reference; DIR/sparse_mla.json and .png.

1. Indexer + top-k in row blocks (model/dsa_rows.py topk_indices, the Triton scorer on CUDA) at
   B=1, 64 index heads of 128, top-2048, against T: time and extra peak memory (everything allocated beyond the inputs,
   the [T, K] int32 indices included), next to the goal 2·T·K·4 bytes; the dense reference
   (index_scores [T, T] + select_topk_latest) where it fits ('OOM' where it does not).
2. One training step (forward + backward, bf16 autocast over fp32 weights, the sparse stage:
   LM loss + indexer KL) of the V3.2 bench shape — deepseek_v3_bench with DSA on every layer
   (index heads 64 × 128, top-2048), --layers layers, B=1 — at each --train-seq, fast path vs
   the dense reference: ms, peak memory, and both runs' CE and indexer loss from the same
   weights and tokens (equal to bf16 noise where both run).
2b. (--parts stages) One DSA layer's sparse training stage by piece at each --train-seq (B=1,
   the bench shape, random inputs): indexer + top-k, sparse attention fwd and fwd+bwd, the
   sparse-stage KL fwd+bwd on its Triton kernels (kernels/indexer_kl) and in torch row blocks,
   with their KL values side by side (equal to bf16 noise).
3. Decoding, batch 1: ms per token of one decode step (a CUDA graph on CUDA, eager otherwise)
   over a static cache of each --decode-ctx tokens (random latent rows and indexer keys: the
   cost depends on the cache length only), fast vs dense, and fast(ctx) / fast(smallest ctx).

Prints one table per part; DIR/results.json and DIR/dsa.png (time and memory vs T, decode
latency vs context). Goals (one H200, bf16): indexer + top-k extra peak <= 2·T·K·4 bytes at
64k; the 32k training step >= 3x faster than the dense one (or the dense one does not fit);
decode at 128k <= 1.5x its latency at the smallest context.
"""
from __future__ import annotations

import argparse
import gc
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from deepwish.bench.env import doc_summary
from deepwish.config import load_config

V32_BENCH = ["model.family=deepseek_v32", "model.mixer=dsa", "model.index_n_heads=64", "model.index_head_dim=128",
             "model.index_topk=2048"]
TINY = ["model.d_model=64", "model.vocab_size=101", "model.index_topk=16", "model.n_mtp=0"]


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev: torch.device, iters: int = 3, warmup: int = 1) -> float:
    """Median milliseconds of fn()."""
    for _ in range(warmup):
        fn()
    sync(dev)
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(dev)
        out.append((time.perf_counter() - t0) * 1e3)
    return sorted(out)[len(out) // 2]


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def release() -> None:
    """Free what the last measurement left, so the next one's peak memory is its own (CUDA only:
    a full collection over the imported libraries' objects costs ~0.4 s, and the CPU has no peak)."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def measured(fn, dev: torch.device, iters: int) -> dict:
    """{'ms', 'peak_extra_bytes'} of fn() (peak over what was allocated before it; CUDA only),
    or {'error': 'OOM' | message}."""
    try:
        release()
        base = 0
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
        ms = timed(fn, dev, iters=iters)
        peak = torch.cuda.max_memory_allocated(dev) - base if dev.type == "cuda" else None
        return {"ms": ms, "peak_extra_bytes": peak}
    except Exception as e:  # noqa: BLE001  (OOM and kernel refusals are results here)
        return {"error": "OOM" if is_oom(e) else f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"}
    finally:
        release()


# ---- 1. indexer + top-k -----------------------------------------------------------------------
def bench_indexer(seqs: list[int], Hi: int, Di: int, K: int, dev: torch.device) -> list[dict]:
    """The fast path with the scorer dsa_backend=auto takes here (the Triton kernel on CUDA)."""
    from deepwish.model.dsa import select_topk_latest
    from deepwish.model.dsa_rows import index_scores, topk_indices
    rows = []
    for T in seqs:
        g = torch.Generator(device=dev).manual_seed(T)
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
        q = torch.randn(1, T, Hi, Di, device=dev, dtype=dt, generator=g)
        k = torch.randn(1, T, Di, device=dev, dtype=dt, generator=g)
        w = torch.randn(1, T, Hi, device=dev, generator=g) * Hi ** -0.5
        pos = torch.arange(T, device=dev)[None]
        scale = Di ** -0.5
        scorer = "triton" if dev.type == "cuda" else "torch"
        fast = measured(lambda: topk_indices(q, w, k, scale, K, pos, pos, causal_prefix=True, scorer=scorer), dev,
                        iters=1 if T >= 32768 else 3)

        def dense():
            s = index_scores(q, w, k, scale)
            return select_topk_latest(s, torch.ones(T, T, dtype=torch.bool, device=dev).tril()[None], K)
        ref = measured(dense, dev, iters=1) if T <= 32768 else {"error": "skipped (T > 32k)"}
        rows.append({"T": T, "K": K, "goal_bytes": 2 * T * K * 4, "scorer": scorer, "fast": fast, "dense": ref})
        del q, k, w
        release()
    return rows


# ---- 2. training step -------------------------------------------------------------------------
def v32_config(base: str, layers: int, seq: int, tiny: bool, backend: str):
    rc = load_config(base, [*(TINY if tiny else V32_BENCH), f"model.n_layers={layers}",
                            f"model.max_seq_len={max(seq, 4096)}", f"model.dsa_backend={backend}"])
    return rc.model


def bench_train(seqs: list[int], layers: int, base: str, tiny: bool, dev: torch.device) -> list[dict]:
    from deepwish.model import Objective
    from deepwish.model.transformer import Transformer
    rows = []
    # the fused linear cross-entropy on CUDA, as the trainer runs it (no [T, V] logits at 32k)
    obj = Objective(indexer_mode="sparse", indexer_weight=1.0, loss_backend="triton" if dev.type == "cuda" else "torch")
    for T in seqs:
        row = {"T": T}
        cfg = v32_config(base, layers, T, tiny, "auto")
        torch.manual_seed(0)
        state = Transformer(cfg).state_dict()
        x = torch.randint(0, cfg.vocab_size, (1, T), device=dev)
        t = torch.randint(0, cfg.vocab_size, (1, T), device=dev)
        for name, backend in (("fast", "auto"), ("dense", "torch")):
            try:
                model = Transformer(replace(cfg, dsa_backend=backend)).to(dev).train()
                model.load_state_dict(state)
            except Exception as e:  # noqa: BLE001
                row[name] = {"error": f"{type(e).__name__}: {e}"[:100]}
                continue
            losses = {}

            def step():
                model.zero_grad(set_to_none=True)
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                    out = model(x, targets=t, objective=obj)
                out.loss.backward()
                losses["ce"] = (out.ce_sum / out.n_targets).item()
                losses["indexer"] = out.aux_losses["indexer"].item()
            r = measured(step, dev, iters=1 if tiny else 3)
            row[name] = {**r, **losses} if "ms" in r else r
            del model
            release()
        rows.append(row)
    return rows


# ---- 2b. one layer's sparse-stage pieces -------------------------------------------------------
def bench_stages(seqs: list[int], base: str, tiny: bool, dev: torch.device, iters: int = 3) -> list[dict]:
    """Where one DSA layer's sparse training step goes, at the bench shape (B=1, the model's heads,
    latent and indexer sizes, random inputs in autocast's dtype): ms of the indexer + top-k, the
    sparse attention forward and forward+backward, and the sparse-stage KL forward+backward on
    each backend ('triton': kernels/indexer_kl with the target from the attention's lse; 'torch':
    row blocks), each with its extra peak memory."""
    from deepwish.kernels.sparse_mla import sparse_mla
    from deepwish.model.dsa_rows import sparse_kl, topk_indices
    cfg = v32_config(base, 1, max(seqs), tiny, "auto")
    Hi, Di, K, H = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk, cfg.n_heads
    R, P = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    gpu = dev.type == "cuda"
    dt = torch.bfloat16 if gpu else torch.float32
    backend = "triton" if gpu else "torch"
    rows = []
    for T in seqs:
        g = torch.Generator(device=dev).manual_seed(T)
        qi = torch.randn(1, T, Hi, Di, device=dev, generator=g).to(dt).requires_grad_()
        w = (torch.randn(1, T, Hi, device=dev, generator=g) * Hi ** -0.5).requires_grad_()
        ki = torch.randn(1, T, Di, device=dev, generator=g).to(dt).requires_grad_()
        qa = (torch.randn(1, T, H, R + P, device=dev, generator=g) * 0.1).to(dt).requires_grad_()
        kv = torch.randn(1, T, R + P, device=dev, generator=g).to(dt).requires_grad_()
        pos = torch.arange(T, device=dev)[None]
        iscale, ascale = Di ** -0.5, (cfg.qk_nope_head_dim + P) ** -0.5
        row = {"T": T, "K": K, "H": H, "D": R + P, "index_heads": Hi}
        scorer = "triton" if gpu else "torch"
        pick = lambda: topk_indices(qi.detach(), w.detach(), ki.detach(), iscale, K, pos, pos,  # noqa: E731
                                    causal_prefix=True, scorer=scorer)
        row["indexer_topk"] = measured(pick, dev, iters)
        idx = pick()
        row["attention_fwd"] = measured(lambda: sparse_mla(qa.detach(), kv.detach(), idx, dv=R, scale=ascale,
                                                           backend=backend), dev, iters)

        def attention_step():
            o, _ = sparse_mla(qa, kv, idx, dv=R, scale=ascale, backend=backend)
            o.float().square().mean().backward()
        row["attention_fwd_bwd"] = measured(attention_step, dev, iters)
        with torch.no_grad():
            _, lse = sparse_mla(qa, kv, idx, dv=R, scale=ascale, backend=backend)
        for name in (["triton"] if gpu else []) + ["torch"]:
            def kl_step():
                loss = sparse_kl(qi, w, ki, qa.detach(), kv.detach(), idx, iscale, ascale, lse=lse, backend=name)
                loss.backward()
                row.setdefault(f"kl_value_{name}", loss.item())
            row[f"kl_fwd_bwd_{name}"] = measured(kl_step, dev, iters)
        rows.append(row)
        del qi, w, ki, qa, kv, idx, lse
        release()
    return rows


# ---- 3. decoding ------------------------------------------------------------------------------
def bench_decode(ctxs: list[int], layers: int, base: str, tiny: bool, dev: torch.device) -> list[dict]:
    from deepwish.generate import decode_one_token
    from deepwish.model.transformer import Transformer
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    rows = []
    for L in ctxs:
        row = {"ctx": L}
        cfg = v32_config(base, layers, L, tiny, "auto")
        torch.manual_seed(0)
        state = Transformer(cfg).state_dict()
        for name, backend in (("fast", "auto"), ("dense", "torch")):
            try:
                model = Transformer(replace(cfg, dsa_backend=backend)).to(dev, dt).eval()
                model.load_state_dict(state)
                cache = model.make_cache(1, L, dtype=dt, device=dev)
                step = decode_one_token
                how = "eager"
                if dev.type == "cuda":
                    from deepwish.decode_graph import CapturedDecoder
                    try:
                        step, how = CapturedDecoder(model, cache), "graph"
                    except Exception as e:  # noqa: BLE001  (reported, then timed eagerly)
                        how = f"eager (capture failed: {type(e).__name__})"
                with torch.no_grad():
                    for c in cache.layers:  # a full cache: random rows, every slot visible
                        c.c_kv.normal_()
                        c.k_pe.normal_()
                        c.index_k.normal_()
                token = torch.zeros(1, dtype=torch.long, device=dev)
                position = torch.full((1,), L - 1, device=dev)
                with torch.no_grad():
                    r = measured(lambda: step(model, token, position, cache), dev, iters=2 if tiny else 10)
                row[name] = {**r, "how": how}
                del model, cache, step
            except Exception as e:  # noqa: BLE001
                row[name] = {"error": "OOM" if is_oom(e) else f"{type(e).__name__}: {str(e)[:80]}"}
            release()
        rows.append(row)
    first = next((r["fast"]["ms"] for r in rows if "ms" in r.get("fast", {})), None)
    for r in rows:
        if first and "ms" in r.get("fast", {}):
            r["fast_vs_first"] = r["fast"]["ms"] / first
    return rows


# ---- report -----------------------------------------------------------------------------------
def cell(r: dict, key: str = "ms", fmt: str = "{:.2f}") -> str:
    if "error" in r:
        return r["error"]
    v = r.get(key)
    return "-" if v is None else fmt.format(v)


def mib(r: dict) -> str:
    return cell(r, "peak_extra_bytes", "{:.0f}") if "error" in r or r.get("peak_extra_bytes") is None else \
        f"{r['peak_extra_bytes'] / 2**20:.0f}"


def print_tables(res: dict) -> None:
    print("\n## indexer + top-k (B=1, row blocks vs dense [T, T])")
    print("| T | K | fast ms | fast extra peak MiB | goal MiB (2·T·K·4) | dense ms | dense extra peak MiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in res["indexer"]:
        print(f"| {r['T']} | {r['K']} | {cell(r['fast'])} | {mib(r['fast'])} | {r['goal_bytes'] / 2**20:.0f} | "
              f"{cell(r['dense'])} | {mib(r['dense'])} |")
    print("\n## training step (fwd+bwd, sparse stage, B=1)")
    print("| T | fast ms | fast peak MiB | dense ms | dense peak MiB | speed-up | CE fast / dense | indexer KL fast / dense |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in res["train"]:
        f, d = r.get("fast", {"error": "-"}), r.get("dense", {"error": "-"})
        up = f"{d['ms'] / f['ms']:.2f}x" if "ms" in f and "ms" in d else ("dense does not fit" if d.get("error") == "OOM" else "-")
        ce = f"{cell(f, 'ce', '{:.4f}')} / {cell(d, 'ce', '{:.4f}')}"
        kl = f"{cell(f, 'indexer', '{:.4g}')} / {cell(d, 'indexer', '{:.4g}')}"
        print(f"| {r['T']} | {cell(f)} | {mib(f)} | {cell(d)} | {mib(d)} | {up} | {ce} | {kl} |")
    if res.get("stages"):
        print("\n## one DSA layer's sparse stage, by piece (B=1, ms / extra peak MiB)")
        print("| T | indexer + top-k | attention fwd | attention fwd+bwd | KL fwd+bwd triton | KL fwd+bwd torch | KL triton / torch |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for r in res["stages"]:
            c = [f"{cell(r[k])} / {mib(r[k])}" if k in r else "-" for k in
                 ("indexer_topk", "attention_fwd", "attention_fwd_bwd", "kl_fwd_bwd_triton", "kl_fwd_bwd_torch")]
            kl = f"{r['kl_value_triton']:.5g} / {r['kl_value_torch']:.5g}" if "kl_value_triton" in r and "kl_value_torch" in r else "-"
            print(f"| {r['T']} | " + " | ".join(c) + f" | {kl} |")
    print("\n## decode (B=1, ms per token)")
    print("| context | fast ms | how | dense ms | fast / fast at first context |")
    print("|---:|---:|---|---:|---:|")
    for r in res["decode"]:
        f, d = r.get("fast", {"error": "-"}), r.get("dense", {"error": "-"})
        ratio = f"{r['fast_vs_first']:.2f}" if "fast_vs_first" in r else "-"
        print(f"| {r['ctx']} | {cell(f, 'ms', '{:.3f}')} | {f.get('how', '-')} | {cell(d, 'ms', '{:.3f}')} | {ratio} |")


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for name in ("fast", "dense"):
        pts = [(r["T"], r[name]["ms"]) for r in res["indexer"] if "ms" in r[name]]
        if pts:
            ax[0].plot(*zip(*pts), marker="o", label=f"indexer+top-k {name} ms")
        pts = [(r["T"], r[name]["peak_extra_bytes"] / 2**20) for r in res["indexer"]
               if r[name].get("peak_extra_bytes") is not None]
        if pts:
            ax[0].plot(*zip(*pts), marker="x", linestyle="--", label=f"{name} extra peak MiB")
        pts = [(r["T"], r[name]["ms"]) for r in res["train"] if "ms" in r.get(name, {})]
        if pts:
            ax[1].plot(*zip(*pts), marker="o", label=name)
        pts = [(r["ctx"], r[name]["ms"]) for r in res["decode"] if "ms" in r.get(name, {})]
        if pts:
            ax[2].plot(*zip(*pts), marker="o", label=name)
    goal = [(r["T"], r["goal_bytes"] / 2**20) for r in res["indexer"]]
    if goal:
        ax[0].plot(*zip(*goal), color="gray", linestyle=":", label="goal MiB (2·T·K·4)")
    for a, title, xl in ((ax[0], "indexer + top-k", "T"), (ax[1], "training step (ms)", "T"),
                         (ax[2], "decode ms / token (B=1)", "context")):
        a.set_title(title)
        a.set_xlabel(xl)
        a.set_xscale("log", base=2)
        a.set_yscale("log")
        a.legend(fontsize=7)
    fig.suptitle(res["env"].get("device", ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def environment(dev: torch.device) -> dict:
    from deepwish.bench.env import bench_environment
    return bench_environment(dev, "deepwish bench dsa")


def ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=doc_summary(__doc__))
    p.add_argument("--out", default="reports/out/dsa")
    p.add_argument("--index-seq", type=ints, default=None, help="T of part 1 (comma-separated)")
    p.add_argument("--train-seq", type=ints, default=None, help="T of part 2")
    p.add_argument("--decode-ctx", type=ints, default=None, help="cache lengths of part 3")
    p.add_argument("--layers", type=int, default=2, help="layers of the V3.2 bench-shape model (parts 2, 3)")
    p.add_argument("--tiny", action="store_true", help="toy shapes (deepseek_v32_tiny), for a CPU check of the bench")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--parts", default="kernel,indexer,stages,train,decode",
                   help="comma list of kernel (the sparse MLA kernel alone; CUDA), indexer, stages (one layer's "
                        "sparse-stage pieces at --train-seq), train, decode")
    p.add_argument("--sweep", action="store_true", help="kernel part: time launch configs first, use the fastest")
    p.add_argument("--tiles", default=None, help="kernel part: a tiles.json from an earlier --sweep")
    p.add_argument("--sweep-kinds", default="fwd,dq,dkv,bwd", help="kernel part, with --sweep: the kernels to sweep")
    a = p.parse_args(argv)
    parts = {x for x in a.parts.split(",") if x}
    known = {"kernel", "indexer", "stages", "train", "decode"}
    if parts - known:
        raise SystemExit(f"deepwish bench dsa: unknown parts {sorted(parts - known)}")
    dev = torch.device(a.device)
    if a.tiny:
        base, Hi, Di, K = "deepseek_v32_tiny", 4, 32, 16
        defaults = ([64, 256], [64, 128], [64, 256])
    else:
        if dev.type != "cuda":
            raise SystemExit("deepwish bench dsa needs a CUDA GPU at the V3.2 bench shape (--tiny runs on the CPU)")
        base, Hi, Di, K = "deepseek_v3_bench", 64, 128, 2048
        defaults = ([4096, 16384, 32768, 65536], [4096, 16384, 32768], [4096, 8192, 32768, 65536, 131072])
    index_seq, train_seq, decode_ctx = (v if v is not None else d for v, d in
                                        zip((a.index_seq, a.train_seq, a.decode_ctx), defaults))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"env": environment(dev), "shape": {"base": base, "index_heads": Hi, "index_dim": Di, "topk": K,
                                              "layers": a.layers}}
    print(f"device: {res['env']['device']} | torch {torch.__version__} | {base} + DSA, {a.layers} layers", flush=True)
    if "kernel" in parts and dev.type == "cuda" and not a.tiny:
        from deepwish.bench.sparse_mla import run as kernel_bench
        kernel_bench(dev, out, ["check", "kernel", "decode"], sweep_first=a.sweep, tiles=a.tiles,
                     sweep_kinds=a.sweep_kinds)
    res["indexer"] = bench_indexer(index_seq, Hi, Di, K, dev) if "indexer" in parts else []
    res["stages"] = bench_stages(train_seq, base, a.tiny, dev) if "stages" in parts else []
    res["train"] = bench_train(train_seq, a.layers, base, a.tiny, dev) if "train" in parts else []
    res["decode"] = bench_decode(decode_ctx, a.layers, base, a.tiny, dev) if "decode" in parts else []
    print_tables(res)
    (out / "results.json").write_text(json.dumps(res, indent=2))
    plot(res, out / "dsa.png")
    print(f"\nwrote {out / 'results.json'} and {out / 'dsa.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
