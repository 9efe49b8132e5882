"""Benchmark: graph-captured decode latency and throughput against the bandwidth roofline and HF.

    python -m deepwish.bench.decode --out reports/bench_decode [--quick] [--compile none|goal|all]
    deepwish bench decode --out reports/bench_decode

Models are random-init in bf16 (no downloads). For each preset, batch and context:
  graph     `decode_graph.CapturedDecoder` replayed `new_tokens` times (token and position
            copied into its static inputs each step), timed with CUDA events: ms/token and
            tokens/s = batch / step time;
  compiled  the same step through torch.compile before capture (by default only for
            qwen3_0.6b at batch 1, the smallest context: compilation costs ~a minute per shape);
  eager     the uncaptured step (batch 1, smallest context), to show what capture buys;
  generate  our `generate()` end to end with the captured step and sampler (`CapturedSampler`; batch
            1, smallest context);
  verify-k4 a captured 5-token chunk forward (speculative verification with k = 4 drafts; batch
            1, smallest context): its time over the one-token step is the verification cost
            ratio r, and speculation pays when E[tokens per round] > r + k·(draft/target cost);
  hf        HF transformers `generate` (greedy, its default SDPA attention) on the same weights
            (save_hf -> AutoModelForCausalLM.from_pretrained(dtype=bfloat16)), batch 1, smallest
            context: per-token time = (t(n tokens) - t(1 token)) / (n - 1), prefill excluded.
The context is not prefilled: a static cache costs the same to decode over whatever it holds,
so the cache is sized context + new tokens (zeros) and decoding starts at position `context`.

Roofline per step = bytes that must move / the GPU's measured copy bandwidth (train/mfu.py
PEAKS: H200 4,172 GB/s, H100 2,973 GB/s; the H100's for a GPU not listed), counted as:
  weights  every parameter once, except: the input embedding reads only B rows (a tied head
           still reads the whole matrix once, as the head); routed experts count only the
           expected number of distinct experts hit by B·k assignments under uniform routing,
           E·(1 - (1 - k/E)^B) of E (random-init routers route nearly uniformly);
  cache    KV / latent caches: the `context` valid positions read (our static cache reads all
           context + new slots, a few % more); recurrent states (conv + delta-rule state) read
           and written (×2);
  logits   B·V written in bf16 and fp32.
fraction = roofline time / measured time.

Goals (the issue), printed met / not met:
  qwen3_0.6b         batch 1 (smallest context) >= 70% of its roofline (HF eager: 9 tok/s);
  deepseek_v3_bench  absorbed MLA at 32k context within 1.5x of its latency at 128 (batch 1);
  qwen3_next_bench   latency growth from the smallest to the largest context no more than that of
                     an "attention-only sibling" (the same config cut to its full-attention
                     layers, same widths and MoE) × 1.25 + 20 µs: the Gated DeltaNet layers must
                     add nothing that grows with the context.
Results: DIR/results.json, DIR/decode.png (ms/token vs context, roofline dashed), table last.
`--compare`: before/after in one process (qwen3_0.6b, context --context, batches 1 and 64): the same
weights through cuBLAS and through each step of the GEMV path (its prologue kernel, decode_fusion,
decode_pdl; `--unfused` adds fuse_projections off), captured and compiled + captured, HF generate with
a static cache beside them, the goals (batch 1 >= 1,800 tok/s and >= 3x HF, batch 64 >= 70% of its
roofline): DIR/compare.json. `python -m deepwish.bench.decode_profile` lists one step's kernels.
`--tradeoff`: the captured step at batches 1..256 and one context instead, drawn as throughput
(tok/s) against latency (ms/token): DIR/tradeoff.json, DIR/decode_tradeoff.png.
A preset that does not exist yet is skipped with a note.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import tempfile
import time
from pathlib import Path

import torch

from deepwish.bench.env import copy_bw, doc_summary

PRESETS = ("qwen3_0.6b", "deepseek_v3_bench", "qwen3_next_bench")
MLA_LONG_CONTEXT = 32768  # the DeepSeek goal's long context (extra row, batch 1)
GOAL_COMPILED = "qwen3_0.6b"  # --compile goal compiles only where a goal needs it (~1 min per shape)


@dataclasses.dataclass
class Row:
    preset: str
    mode: str  # graph | compiled | eager | generate | hf | graph-attn-only
    batch: int
    context: int
    ms_per_step: float | None = None
    tok_s: float | None = None
    roofline_ms: float | None = None
    roofline_frac: float | None = None
    weight_gb: float | None = None
    cache_gb: float | None = None
    note: str = ""


# ---- byte counting ----------------------------------------------------------------------------
def step_bytes(model, batch: int, context: int) -> tuple[float, float]:
    """(weight bytes, cache + logits bytes) one decode step must move; see the module docstring."""
    from deepwish.model.cache import KVCache, MLACache, RecurrentCache
    cfg = model.cfg
    weights = 0.0
    distinct = cfg.n_experts * (1 - (1 - cfg.n_experts_per_tok / cfg.n_experts) ** batch) if cfg.n_experts else 0
    for name, p in model.named_parameters():
        nb = p.numel() * p.element_size()
        if name == "embed.weight":
            nb = batch * p.shape[1] * p.element_size() + (nb if model.lm_head is None else 0)
        elif p.dim() == 3 and name.endswith(("w_gate_up", "w_down")):
            nb = nb * distinct / cfg.n_experts
        weights += nb
    probe = model.make_cache(1, 2, device="meta")
    cache = 0.0
    for layer in probe.layers:
        nb = sum(t.numel() * t.element_size() for t in vars(layer).values() if isinstance(t, torch.Tensor))
        if isinstance(layer, (KVCache, MLACache)):  # incl. DSACache: per position
            cache += nb / 2 * context * batch
        elif isinstance(layer, RecurrentCache):
            cache += 2 * nb * batch
        else:
            raise ValueError(f"no byte rule for cache type {type(layer).__name__}")
    logits = batch * cfg.vocab_size * (2 + 4)
    return weights, cache + logits


def cache_bytes(model, batch: int, length: int) -> int:
    probe = model.make_cache(1, 2, device="meta")
    total = 0
    for layer in probe.layers:
        nb = sum(t.numel() * t.element_size() for t in vars(layer).values() if isinstance(t, torch.Tensor))
        total += nb / 2 * length if hasattr(layer, "max_len") else nb
    return int(total * batch)


# ---- timing -------------------------------------------------------------------------------------
def _time_steps(step, n: int, warmup: int = 3) -> float:
    """Mean ms per call of step(i) over n calls, by CUDA events."""
    for i in range(warmup):
        step(i)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(n):
        step(i)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def _decode_rows(preset, model, batch, context, new_tokens, modes, device, label: str | None = None) -> list[Row]:
    """One row per mode; `label` renames the rows (e.g. the attention-only sibling's)."""
    from deepwish.decode_graph import CapturedDecoder, CapturedSampler, CapturedSteps
    from deepwish.generate import decode_one_token
    V = model.cfg.vocab_size
    length = context + new_tokens
    w, c = step_bytes(model, batch, context)
    roof_ms = (w + c) / copy_bw() * 1e3
    rows = []
    tokens = torch.randint(0, V, (new_tokens, batch), device=device)
    positions = (context + torch.arange(new_tokens, device=device))[:, None].expand(-1, batch).contiguous()
    for mode in modes:
        row = Row(preset, mode, batch, context, roofline_ms=roof_ms, weight_gb=w / 1e9, cache_gb=c / 1e9)
        cache = dec = None
        try:
            cache = model.make_cache(batch, length)
            if mode == "eager":
                ms = _time_steps(lambda i: decode_one_token(model, tokens[i], positions[i], cache), min(new_tokens, 16))
            elif mode == "verify-k4":
                steps = CapturedSteps(model, cache, lengths=(5,))
                chunk_tok = torch.randint(0, V, (new_tokens, batch, 5), device=device)
                chunk_pos = (positions[:, :, None] + torch.arange(5, device=device)).clamp(max=length - 1)
                ms = _time_steps(lambda i: steps(model, chunk_tok[i], chunk_pos[i], cache), new_tokens)
                del steps
            else:
                if mode == "compiled":
                    torch._dynamo.reset()  # a fresh compile per shape, not a recompile-limit fallback
                if mode == "generate":  # the path `generate` takes on CUDA: the token picked inside the graph
                    dec = CapturedSampler(model, cache)
                    ms = _generate_ms(model, cache, dec, context, new_tokens, device)
                else:
                    dec = CapturedDecoder(model, cache, compile=mode == "compiled")
                    ms = _time_steps(lambda i: dec(model, tokens[i], positions[i], cache), new_tokens)
            row.ms_per_step, row.tok_s = ms, batch * 1e3 / ms
            row.roofline_frac = roof_ms / ms
        except torch.OutOfMemoryError:
            row.note = "OOM"
        except Exception as e:  # one failing shape is reported in the table, the run goes on
            row.note = f"failed: {type(e).__name__}: {str(e)[:160]}"
        del dec, cache
        gc.collect()
        torch.cuda.empty_cache()
        if mode == "verify-k4" and row.ms_per_step:
            row.tok_s = 5 * batch * 1e3 / row.ms_per_step  # tokens checked per second
            one = next((r for r in rows if r.mode == "graph" and r.ms_per_step), None)
            if one:
                row.note = f"verification cost r = {row.ms_per_step / one.ms_per_step:.2f}x the 1-token step"
        if label is not None:
            row.mode = label
        rows.append(row)
        print(_fmt(row), flush=True)
    return rows


def _generate_ms(model, cache, dec, context, new_tokens, device) -> float:
    from deepwish.generate import generate
    prompt = torch.randint(0, model.cfg.vocab_size, (1, context)).tolist()

    def run(n):
        cache.reset()
        torch.cuda.synchronize()
        t = time.perf_counter()
        generate(model, prompt, n, cache=cache, decode_fn=dec)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    run(2)
    t1, tn = run(1), run(new_tokens)
    return (tn - t1) / (new_tokens - 1) * 1e3


def hf_row(preset, model, context, new_tokens, device, static: bool = False, batch: int = 1) -> Row:
    """HF transformers generate on the same weights. static: with a `StaticCache` of fixed length
    (context + new_tokens + 1, reset between calls), which HF's generate compiles its forward for
    (`torch.compile`, on its first call: the warm-up); else HF's default dynamic cache."""
    from transformers import AutoModelForCausalLM

    from deepwish.hf.io import save_hf
    row = Row(preset, "hf-static" if static else "hf", batch, context)
    w, c = step_bytes(model, batch, context)
    row.roofline_ms, row.weight_gb, row.cache_gb = (w + c) / copy_bw() * 1e3, w / 1e9, c / 1e9
    try:
        with tempfile.TemporaryDirectory() as tmp:
            save_hf(model, tmp, dtype=torch.bfloat16)
            hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16).to(device).eval()
        hf.generation_config.eos_token_id = None
        hf.generation_config.pad_token_id = 0
        ids = torch.randint(0, model.cfg.vocab_size, (batch, context), device=device)
        mask = torch.ones_like(ids)
        kw = {}
        if static:
            from transformers import StaticCache
            kw["past_key_values"] = StaticCache(config=hf.config, max_cache_len=context + new_tokens + 1)

        def run(n):
            if static:
                kw["past_key_values"].reset()
            torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.no_grad():
                hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, **kw)
            torch.cuda.synchronize()
            return time.perf_counter() - t

        run(2)
        run(new_tokens)  # a static cache: the compiled forward's first calls (warm-up, cudagraph recording)
        t1, tn = run(1), run(new_tokens)
        row.ms_per_step = (tn - t1) / (new_tokens - 1) * 1e3
        row.tok_s = batch * 1e3 / row.ms_per_step
        row.roofline_frac = row.roofline_ms / row.ms_per_step
        del hf
    except Exception as e:  # reported in the table, never silently dropped
        row.note = f"hf failed: {type(e).__name__}: {str(e)[:120]}"
    gc.collect()
    torch.cuda.empty_cache()
    print(_fmt(row), flush=True)
    return row


# ---- models -------------------------------------------------------------------------------------
def build(cfg, device) -> torch.nn.Module:
    from deepwish.model.transformer import Transformer
    with torch.device(device):
        model = Transformer(cfg)
    return model.to(torch.bfloat16).eval()


def attention_only(cfg):
    """The same config cut to its full-attention layers (hybrid stacks only)."""
    n_attn = sum(1 for m, _ in cfg.layer_types if m == cfg.attn_mixer)
    return dataclasses.replace(cfg, n_layers=n_attn, full_attention_interval=0, mixer=cfg.attn_mixer, layer_mixers=())


def run_preset(preset, batches, contexts, new_tokens, hf_tokens, compile_mode, device) -> list[Row]:
    from deepwish.config import model_config
    long = [MLA_LONG_CONTEXT] if preset.startswith("deepseek") else []
    need = max(list(contexts) + long) + new_tokens + 1
    cfg = model_config(preset)
    cfg = dataclasses.replace(cfg, max_seq_len=max(cfg.max_seq_len, need))
    model = build(cfg, device)
    rows = []
    free = torch.cuda.mem_get_info()[0]
    for ctx in contexts:
        for b in batches:
            first = b == batches[0] and ctx == contexts[0]
            modes = ["graph"]
            if compile_mode == "all" or (compile_mode == "goal" and first and preset == GOAL_COMPILED):
                modes.append("compiled")
            if first:
                modes += ["eager", "generate", "verify-k4"]
            if cache_bytes(model, b, ctx + new_tokens) > 0.8 * free:
                rows.append(Row(preset, "graph", b, ctx, note=f"skipped: cache "
                                f"{cache_bytes(model, b, ctx + new_tokens) / 1e9:.1f} GB > 80% of free memory"))
                print(_fmt(rows[-1]), flush=True)
                continue
            rows += _decode_rows(preset, model, b, ctx, new_tokens, modes, device)
    for ctx in long:
        rows += _decode_rows(preset, model, 1, ctx, new_tokens, ["graph"], device)
    if hf_tokens > 1:
        rows.append(hf_row(preset, model, contexts[0], hf_tokens, device))
    del model
    gc.collect()
    torch.cuda.empty_cache()
    if cfg.full_attention_interval > 0:
        sib = build(attention_only(cfg), device)
        for ctx in (contexts[0], contexts[-1]):
            rows += _decode_rows(preset, sib, 1, ctx, new_tokens, ["graph"], device, label="graph-attn-only")
        del sib
        gc.collect()
        torch.cuda.empty_cache()
    return rows


# ---- goals, table, plot ------------------------------------------------------------------------
def _find(rows, preset, mode, batch, context):
    for r in rows:
        if (r.preset, r.mode, r.batch, r.context) == (preset, mode, batch, context) and r.ms_per_step:
            return r
    return None


def goals(rows, contexts) -> list[dict]:
    out = []
    lo, hi = contexts[0], contexts[-1]
    best = [r for r in rows if r.preset == "qwen3_0.6b" and r.batch == 1 and r.context == lo
            and r.mode in ("graph", "compiled") and r.roofline_frac]
    if best:
        b = max(best, key=lambda r: r.roofline_frac)
        hf = _find(rows, "qwen3_0.6b", "hf", 1, lo)
        out.append({"goal": "qwen3_0.6b batch 1 >= 70% of roofline", "met": b.roofline_frac >= 0.7,
                    "value": f"{b.tok_s:.0f} tok/s ({b.mode}) = {b.roofline_frac:.0%} of {1e3 / b.roofline_ms:.0f}"
                             + (f"; HF {hf.tok_s:.1f} tok/s" if hf else "")})
    short, longr = (_find(rows, "deepseek_v3_bench", "graph", 1, lo),
                    _find(rows, "deepseek_v3_bench", "graph", 1, MLA_LONG_CONTEXT))
    if short and longr:
        ratio = longr.ms_per_step / short.ms_per_step
        out.append({"goal": f"deepseek_v3_bench 32k latency <= 1.5x the {lo}-context latency", "met": ratio <= 1.5,
                    "value": f"{longr.ms_per_step:.3f} / {short.ms_per_step:.3f} ms = {ratio:.2f}x"})
    n_lo, n_hi = _find(rows, "qwen3_next_bench", "graph", 1, lo), _find(rows, "qwen3_next_bench", "graph", 1, hi)
    a_lo, a_hi = (_find(rows, "qwen3_next_bench", "graph-attn-only", 1, lo),
                  _find(rows, "qwen3_next_bench", "graph-attn-only", 1, hi))
    if n_lo and n_hi and a_lo and a_hi:
        grow, attn_grow = n_hi.ms_per_step - n_lo.ms_per_step, a_hi.ms_per_step - a_lo.ms_per_step
        out.append({"goal": f"qwen3_next_bench latency growth {lo}->{hi} <= attention-only growth x1.25 + 20us",
                    "met": grow <= 1.25 * attn_grow + 0.02,
                    "value": f"growth {grow * 1e3:.0f} us vs attention layers alone {attn_grow * 1e3:.0f} us"})
    return out


def _fmt(r: Row) -> str:
    if r.ms_per_step is None:
        return f"{r.preset:18s} {r.mode:16s} b{r.batch:<3d} ctx {r.context:6d}  {r.note}"
    return (f"{r.preset:18s} {r.mode:16s} b{r.batch:<3d} ctx {r.context:6d}  {r.ms_per_step:8.3f} ms/step "
            f"{r.tok_s:9.1f} tok/s  roofline {r.roofline_ms:7.3f} ms ({r.roofline_frac:5.1%})  {r.note}")


def plot(rows, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    presets = sorted({r.preset for r in rows})
    fig, axes = plt.subplots(1, len(presets), figsize=(5 * len(presets), 4), squeeze=False)
    for ax, p in zip(axes[0], presets):
        for b in sorted({r.batch for r in rows if r.preset == p and r.mode == "graph"}):
            pts = sorted((r.context, r.ms_per_step, r.roofline_ms) for r in rows
                         if r.preset == p and r.mode == "graph" and r.batch == b and r.ms_per_step)
            if not pts:
                continue
            line, = ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], "o-", label=f"batch {b}")
            ax.plot([x for x, _, _ in pts], [z for _, _, z in pts], "--", color=line.get_color(), alpha=0.6)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("ms per decode step (dashed: roofline)")
        ax.set_title(p)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def environment() -> dict:
    from deepwish.bench.env import bench_environment
    return bench_environment("cuda", "deepwish bench decode", copy_bandwidth=copy_bw())


def run(out_dir, presets=PRESETS, batches=(1, 8, 64), prompts=(128, 2048, 8192), new_tokens: int = 64,
        hf_tokens: int = 16, compile: str = "goal", device: str = "cuda") -> dict:
    from deepwish.config import ConfigError, preset_path
    if not torch.cuda.is_available() or not str(device).startswith("cuda"):
        raise RuntimeError("the decode benchmark needs a CUDA device")
    if compile not in ("none", "goal", "all"):
        raise ValueError(f"compile={compile!r} is not one of none, goal, all")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    rows, notes = [], []
    for p in presets:
        try:
            preset_path(p)
        except ConfigError:
            notes.append(f"preset {p} does not exist yet: skipped")
            print(notes[-1], flush=True)
            continue
        rows += run_preset(p, tuple(batches), tuple(prompts), new_tokens, hf_tokens, compile, device)
    g = goals(rows, tuple(prompts))
    doc = {"env": environment(), "batches": list(batches), "contexts": list(prompts), "new_tokens": new_tokens,
           "hf_tokens": hf_tokens, "compile": compile, "notes": notes, "goals": g,
           "rows": [dataclasses.asdict(r) for r in rows], "seconds": time.time() - t0}
    (out / "results.json").write_text(json.dumps(doc, indent=2))
    if rows:
        plot(rows, out / "decode.png")
    print(f"\n== decode benchmark ({doc['env']['device']}, torch {torch.__version__}, "
          f"{doc['seconds']:.0f} s); roofline at {copy_bw() / 1e9:.0f} GB/s ==")
    for r in rows:
        print(_fmt(r))
    for n in notes:
        print("note:", n)
    for x in g:
        print(f"goal {'MET    ' if x['met'] else 'NOT MET'} {x['goal']}: {x['value']}")
    return doc


def run_compare(out_dir, preset: str = "qwen3_0.6b", batches=(1, 64), context: int = 512, new_tokens: int = 64,
                hf_tokens: int = 32, compile_batches=(1, 64), device: str = "cuda", unfused: bool = False) -> dict:
    """Before/after in one process, on the same weights: cuBLAS with model.fuse_projections on (no
    suffix); model.decode_matmul=triton (`-gemv`: kernels/gemv for the step's matmuls, batches <= 64, <= 16 compiled,
    with model.decode_prologue on), that with the prologue off (`-gemv-sep`: QK-norm, rotary and the
    cache write as separate ops), with model.decode_fusion on (`-gemv-fused`: the block's norms,
    SwiGLU and residual adds inside the GEMVs) and with decode_pdl on as well (`-gemv-pdl`); each
    captured (`graph`) and compiled + captured (`compiled`, at `compile_batches`); HF generate with a
    static cache (batch 1); the roofline beside every row. `unfused` adds the rows with
    fuse_projections off (`-unfused`: q, k, v as three matmuls; 2.389 ms compiled at batch 1 on an
    H200, reports/inference.md). Rows print as they finish, most important first (a run cut short
    keeps them). Writes DIR/compare.json."""
    from deepwish.config import model_config
    if not torch.cuda.is_available() or not str(device).startswith("cuda"):
        raise RuntimeError("the decode benchmark needs a CUDA device")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    cfg = model_config(preset)
    cfg = dataclasses.replace(cfg, max_seq_len=max(cfg.max_seq_len, context + max(new_tokens, hf_tokens) + 2))
    torch.manual_seed(0)
    # every decode option off, then on one at a time (the defaults have them all on: the last model)
    off = dict(decode_prologue=False, decode_fusion=False, decode_pdl="off")
    # cuBLAS for the fused and unfused models (decode_matmul defaults to auto: the GEMV on CUDA)
    fused = build(dataclasses.replace(cfg, fuse_projections=True, decode_matmul="torch", **off), device)
    if unfused:
        unfused = build(dataclasses.replace(cfg, fuse_projections=False, decode_matmul="torch", **off), device)
        unfused.load_state_dict(fused.state_dict())
    # fused, kernels/gemv for <= 64 rows (16 compiled), and QK-norm / rotary / the cache write in one kernel (model.decode_prologue)
    gemv = build(dataclasses.replace(cfg, decode_matmul="triton", **{**off, "decode_prologue": True}), device)
    gemv.load_state_dict(fused.state_dict())
    # the same with those as separate ops: the row before the prologue kernel
    separate = build(dataclasses.replace(cfg, decode_matmul="triton", **off), device)
    separate.load_state_dict(fused.state_dict())
    # the block's norms, SwiGLU and residual adds in the GEMVs (model.decode_fusion), then with PDL too
    fusion = build(dataclasses.replace(cfg, decode_matmul="triton", decode_prologue=True, decode_fusion=True,
                                       decode_pdl="off"), device)
    fusion.load_state_dict(fused.state_dict())
    pdl = None
    if torch.cuda.get_device_capability()[0] >= 9:  # programmatic dependent launch: Hopper or later
        pdl = build(dataclasses.replace(cfg, decode_matmul="triton", decode_prologue=True, decode_fusion=True,
                                        decode_pdl="on"), device)
        pdl.load_state_dict(fused.state_dict())
    print(f"== decode before/after: {preset}, context {context}, batches {list(batches)}; roofline at "
          f"{copy_bw() / 1e9:.0f} GB/s ({torch.cuda.get_device_name()})", flush=True)
    rows = []
    plan = []  # (model, label, mode, batch), most important first
    from deepwish.kernels.gemv import MAX_ROWS, MAX_ROWS_CAPTURED
    for b in batches:
        # the rows kernel serves the batch (captured; compiled): else the gemv models are the fused one
        small, small_compiled = b <= MAX_ROWS_CAPTURED, b <= MAX_ROWS
        if b in compile_batches:  # ~1 min of compilation each: the unfused one only where the GEMV runs too
            plan += [(pdl, "compiled-gemv-pdl", "compiled", b)] if small_compiled and pdl is not None else []
            plan += [(fusion, "compiled-gemv-fused", "compiled", b), (gemv, "compiled-gemv", "compiled", b),
                     (separate, "compiled-gemv-sep", "compiled", b)] if small_compiled else []
            plan += [(fused, "compiled", "compiled", b)]
            plan += [(unfused, "compiled-unfused", "compiled", b)] if small_compiled and unfused else []
        plan += [(fused, "graph", "graph", b)] + ([(unfused, "graph-unfused", "graph", b)] if unfused else [])
        plan += [(pdl, "graph-gemv-pdl", "graph", b)] if small and pdl is not None else []
        plan += [(fusion, "graph-gemv-fused", "graph", b), (gemv, "graph-gemv", "graph", b),
                 (separate, "graph-gemv-sep", "graph", b)] if small else []
    first = True
    for model, label, mode, b in plan:
        rows += _decode_rows(preset, model, b, context, new_tokens, [mode], device, label=label)
        if first:
            rows.append(hf_row(preset, fused, context, hf_tokens, device, static=True))
            first = False
    ours = tuple(f"{m}{s}" for m in ("graph", "compiled") for s in ("", "-gemv", "-gemv-sep", "-gemv-fused", "-gemv-pdl"))
    best1 = max((r for r in rows if r.batch == 1 and r.mode in ours and r.tok_s), default=None,
                key=lambda r: r.tok_s)
    hf = next((r for r in rows if r.mode == "hf-static" and r.tok_s), None)
    best64 = max((r for r in rows if r.batch == max(batches) and r.mode in ours and r.tok_s),
                 default=None, key=lambda r: r.tok_s)
    g = []
    if best1:
        g.append({"goal": "batch 1 >= 1,800 tok/s", "met": best1.tok_s >= 1800,
                  "value": f"{best1.tok_s:.0f} tok/s ({best1.mode}), {best1.roofline_frac:.0%} of roofline"})
        if hf:
            g.append({"goal": "batch 1 >= 3x HF static-cache generate", "met": best1.tok_s >= 3 * hf.tok_s,
                      "value": f"{best1.tok_s / hf.tok_s:.2f}x ({hf.tok_s:.0f} tok/s)"})
    if best64 and max(batches) > 1:
        g.append({"goal": f"batch {best64.batch} >= 70% of its roofline", "met": best64.roofline_frac >= 0.7,
                  "value": f"{best64.tok_s:.0f} tok/s ({best64.mode}) = {best64.roofline_frac:.0%}"})
    doc = {"env": environment(), "preset": preset, "context": context, "batches": list(batches),
           "new_tokens": new_tokens, "hf_tokens": hf_tokens, "goals": g,
           "rows": [dataclasses.asdict(r) for r in rows], "seconds": time.time() - t0}
    (out / "compare.json").write_text(json.dumps(doc, indent=2))
    print(f"\n== decode before/after ({doc['env']['device']}, torch {torch.__version__}, {doc['seconds']:.0f} s)")
    for r in rows:
        print(_fmt(r))
    for x in g:
        print(f"goal {'MET    ' if x['met'] else 'NOT MET'} {x['goal']}: {x['value']}")
    return doc


TRADEOFF_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def run_tradeoff(out_dir, presets=("qwen3_0.6b",), batches=TRADEOFF_BATCHES, context: int = 512,
                 new_tokens: int = 32, device: str = "cuda") -> dict:
    """Throughput against latency: the captured step at each batch size, one context. Writes
    tradeoff.json and decode_tradeoff.png (tok/s against ms/token, one point per batch)."""
    from deepwish.config import model_config
    if not torch.cuda.is_available() or not str(device).startswith("cuda"):
        raise RuntimeError("the decode benchmark needs a CUDA device")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for p in presets:
        cfg = model_config(p)
        cfg = dataclasses.replace(cfg, max_seq_len=max(cfg.max_seq_len, context + new_tokens + 1))
        model = build(cfg, device)
        free = torch.cuda.mem_get_info()[0]
        for b in batches:
            if cache_bytes(model, b, context + new_tokens) > 0.8 * free:
                rows.append(Row(p, "graph", b, context, note="skipped: cache > 80% of free memory"))
                print(_fmt(rows[-1]), flush=True)
                continue
            rows += _decode_rows(p, model, b, context, new_tokens, ["graph"], device)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    doc = {"env": environment(), "context": context, "new_tokens": new_tokens, "batches": list(batches),
           "rows": [dataclasses.asdict(r) for r in rows]}
    (out / "tradeoff.json").write_text(json.dumps(doc, indent=2))
    plot_tradeoff(rows, out / "decode_tradeoff.png", context)
    print(f"\n== decode throughput vs latency ({doc['env']['device']}), context {context}, captured step")
    for r in rows:
        print(_fmt(r))
    return doc


def plot_tradeoff(rows, path: Path, context: int) -> None:
    """tok/s (y) against ms per token (x), a line per preset, each point labelled with its batch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 5))
    for p in sorted({r.preset for r in rows}):
        pts = sorted((r.batch, r.ms_per_step, r.tok_s) for r in rows if r.preset == p and r.ms_per_step)
        if not pts:
            continue
        ax.plot([m for _, m, _ in pts], [t for _, _, t in pts], "o-", label=p)
        for b, m, t in pts:
            ax.annotate(f"b{b}", (m, t), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("latency: ms per token (one decode step)")
    ax.set_ylabel("throughput: tokens / s (batch / step time)")
    ax.set_title(f"decode throughput vs latency, captured step, context {context}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deepwish.bench.decode", description=doc_summary(__doc__))
    ap.add_argument("--out", required=True, help="output directory (results.json, decode.png)")
    ap.add_argument("--quick", action="store_true", help="smoke test: batches 1,8; contexts 128,1024; 16 tokens")
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--compile", default=None, choices=["none", "goal", "all"],
                    help="torch.compile the step before capture: none, goal (batch 1, smallest context; "
                         "default) or all shapes")
    ap.add_argument("--tradeoff", action="store_true",
                    help="throughput vs latency instead: the captured step at batches 1..256 (--batches), one "
                         "context (--context); presets default to qwen3_0.6b")
    ap.add_argument("--batches", default=",".join(map(str, TRADEOFF_BATCHES)), help="with --tradeoff")
    ap.add_argument("--context", type=int, default=512, help="with --tradeoff or --compare")
    ap.add_argument("--compare", action="store_true",
                    help="before/after in one process: cuBLAS and the GEMV path's steps (prologue kernel, "
                         "decode_fusion, decode_pdl), captured and compiled + captured, at --compare-batches (default 1,64) and --context, HF static-cache generate "
                         "beside them (first preset of --presets; default qwen3_0.6b)")
    ap.add_argument("--compare-batches", default="1,64", help="with --compare")
    ap.add_argument("--compile-batches", default="1,64", help="with --compare: batches also compiled (~1 min each)")
    ap.add_argument("--unfused", action="store_true", help="with --compare: also model.fuse_projections off")
    args = ap.parse_args(argv)
    presets = tuple(p for p in args.presets.split(",") if p)
    if args.compare:
        preset = presets[0] if args.presets != ",".join(PRESETS) else "qwen3_0.6b"
        ints = lambda s: tuple(int(b) for b in s.split(",") if b)  # noqa: E731
        run_compare(args.out, preset, ints(args.compare_batches), args.context,
                    compile_batches=ints(args.compile_batches), unfused=args.unfused)
        return 0
    if args.tradeoff:
        if args.presets == ",".join(PRESETS):
            presets = ("qwen3_0.6b",)
        run_tradeoff(args.out, presets, tuple(int(b) for b in args.batches.split(",") if b), args.context)
        return 0
    if args.quick:
        run(args.out, presets, batches=(1, 8), prompts=(128, 1024), new_tokens=16, hf_tokens=4,
            compile=args.compile or "none")
    else:
        run(args.out, presets, compile=args.compile or "goal")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
