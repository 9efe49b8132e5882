"""Benchmark: training throughput on one GPU, deepwish against HF transformers at the same shapes.

    python -m deepwish.bench.train --out reports/bench_train --preset qwen3_0.6b [--batch 8 --seq 2048 --steps 10]
    deepwish bench train --out reports/bench_train --preset qwen3_0.6b

For each preset (several may be given) it times, in one process, one after the other (HF first,
before anything of ours is resident; each result records what was still allocated before it):
  deepwish        the trainer's own step (train/loss.py lm_loss, train/parallel.py wrapping): per-block
                  torch.compile, fused linear cross-entropy (train.loss_backend=auto -> triton), SDPA
                  flash attention, fp32 master weights under bf16 autocast, AdamW (fused), clipping;
  deepwish-muon   the same with Muon on the hidden matrices (the trainer's default optimizer;
                  train.muon_backend=auto here: the Triton step on CUDA);
  deepwish-muon-torch  the same with train.muon_backend=torch (cuBLAS Newton–Schulz, foreach
                  momentum/update): the Muon step before its kernels, for the before/after;
  deepwish-muon-overlap  deepwish-muon with train.optimizer_overlap=true (AdamW's part of the step
                  on a second stream beside Muon's Newton–Schulz);
  deepwish-eager  the same as `deepwish` without torch.compile;
  deepwish-fsdp1  the same as `deepwish` under FSDP2 on a one-rank group: bf16 parameters for
                  compute (MixedPrecisionPolicy: cast once per step, not per matmul by autocast),
                  fp32 master weights and gradient reduction;
  NAME+bf16       any deepwish variant with train.residual_dtype=bf16 (the residual stream in bf16,
                  as FSDP2's bf16 parameters give; e.g. deepwish+bf16, deepwish-muon+bf16);
  NAME+cd         any deepwish variant with train.compile_mode=coordinate-descent (inductor times
                  each fused elementwise/reduction kernel's launch config; same numerics class);
                  suffixes combine: deepwish+bf16+cd;
  hf              transformers' model built from the same config (config_to_hf of our HF table),
                  SDPA attention, fp32 weights under bf16 autocast, fused AdamW, clipping, the
                  model's own loss (labels=input_ids) — what a user of HF would run. Tried at the
                  benchmark batch and, if that does not fit, at half of it.
  hf-liger        the same HF model with Liger kernels (liger_kernel.transformers.apply_liger_kernel_to_qwen3:
                  RMSNorm, rotary, SwiGLU, fused linear cross-entropy), Qwen3 only; skipped with a
                  line saying why when liger_kernel is not importable or the family has no patch.
                  Liger patches transformers' Qwen3 classes process-wide, so it runs after `hf`.
  torchtitan      torchtitan's own Qwen3 of the same shape (carried as a wheel): its model, its
                  initialisation, per-block compile and single-device precision (bf16 autocast
                  over fp32 parameters), fused AdamW, clipping; qwen3 presets only. torchtitan 0.2
                  (qwen3_args, the release for the GPU machine's torch 2.11): its default SDPA
                  attention, plain causal like the other variants; torchtitan 0.3 (qwen3_configs,
                  needs a newer torch): FlexAttention with its per-batch causal mask (it has no
                  SDPA path). Skipped with a line saying why when torchtitan is not importable.
  deepwish-packed the trainer's real input: PackedLoader batches of the embedded corpus (the
                  default shards `deepwish train` builds) or of `--packed-data DIR` (a corpus
                  `deepwish data build` wrote), with per-token document ids and positions, so
                  attention runs with document isolation (model.attn_backend=auto: the own flash
                  kernel on CUDA; the other variants' plain causal input takes SDPA flash).
                  Compare with `deepwish` for the cost of document isolation. The row reports
                  its mean documents per row: the embedded corpus (eleven plays) gives ~1, i.e.
                  mostly the plain causal path.
The other variants take random token ids, no packing (plain causal attention, the flash path).

Reported per run: tokens/s, step time, MFU = tok/s × model.flops_per_token(seq) / the device's
measured bf16 matmul peak (train/mfu.py: the same count and peak table as the trainer's progress
line, printed with its source; the same FLOP count for every variant), peak allocated memory, and 'OOM' when a run does not fit. Results go to DIR/results.json and
DIR/train_throughput.png; a table is printed last. Goals (issue): qwen3_0.6b >= 80k tok/s and
>= 45% MFU at batch 8 (HF: 35.0k tok/s at batch 4, OOM at 8); deepseek_v3_bench >= 2x HF
(71.1k); qwen3_next_bench >= 4x HF (17.1k). A preset that does not exist yet is skipped with a note.

Scaling (2 GPUs, FSDP2, the real trainer on the embedded corpus):
    python -m deepwish.bench.train --out reports/bench_scaling --scaling 2 --preset qwen3_0.6b --batch 8 --steps 80
runs `deepwish train` under torchrun on 1 GPU and on N GPUs with the same global batch (so the
loss curves must coincide up to bf16 noise), then on N GPUs with N times the global batch (weak
scaling, as N-fold gradient accumulation), and reports the strong and weak scaling efficiency
tok/s(N) / (N × tok/s(1)). On the embedded corpus (2048-token vocabulary; its val shard holds 16
windows of 2048) keep batch × N <= 16 at seq 2048.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

from deepwish.bench.env import doc_summary
from deepwish.train.mfu import device_peak_flops, mfu

GOALS = {
    "qwen3_0.6b": {"tok_s": 80e3, "mfu": 0.45, "hf_anchor_tok_s": 35.0e3,
                   "note": "HF anchor at batch 4 (OOM at 8)"},
    "deepseek_v3_bench": {"hf_ratio": 2.0, "hf_anchor_tok_s": 71.1e3, "note": "HF anchor at batch 4"},
    "qwen3_next_bench": {"hf_ratio": 4.0, "hf_anchor_tok_s": 17.1e3, "note": "HF anchor at batch 4"},
}
# HF first: nothing of ours (compiled graphs, caches) is resident yet when it tries to fit.
VARIANTS = ("hf", "hf-liger", "torchtitan", "deepwish", "deepwish-packed", "deepwish-muon", "deepwish-muon-torch",
            "deepwish-muon-overlap", "deepwish-eager", "deepwish-fsdp1")


@dataclasses.dataclass
class Result:
    preset: str
    variant: str
    batch: int
    seq: int
    status: str  # ok | OOM | error: ...
    tok_s: float | None = None
    step_ms: float | None = None
    mfu: float | None = None
    peak_gib: float | None = None
    first_step_s: float | None = None  # includes compilation
    resident_gib_before: float | None = None  # allocated before building (left over from earlier runs)
    loss_first: float | None = None
    loss_last: float | None = None
    docs_per_row: float | None = None  # deepwish-packed: mean documents per row of its batches


# ---- the two step functions ----------------------------------------------------------------------
# a deepwish variant's suffixes ('deepwish+bf16+cd'): each one setting of the trainer's
SUFFIXES = {"bf16": "train.residual_dtype=bf16", "cd": "train.compile_mode=coordinate-descent"}


def variant_parts(variant: str) -> tuple[str, tuple[str, ...]]:
    """'deepwish-muon+bf16+cd' -> ('deepwish-muon', ('bf16', 'cd')): a deepwish variant with the
    settings of SUFFIXES on top; suffixes are refused on the anchors."""
    base, *mods = variant.split("+")
    if base not in VARIANTS:
        raise ValueError(f"bench train: unknown variant {base!r}; known: {', '.join(VARIANTS)}")
    bad = [m for m in mods if m not in SUFFIXES]
    if bad or (mods and not base.startswith("deepwish")) or len(set(mods)) < len(mods):
        raise ValueError(f"bench train: variant {variant!r}: suffixes are {', '.join('+' + m for m in SUFFIXES)}, "
                         f"each at most once, on deepwish variants")
    return base, tuple(mods)


def _run_config(preset: str, batch: int, seq: int, variant: str):
    from deepwish.config import load_config

    variant, mods = variant_parts(variant)
    sets = [f"train.batch_size={batch}", f"train.seq_len={seq}", "train.loss_backend=auto",
            "train.compile=" + ("'off'" if variant == "deepwish-eager" else "'on'"),  # quoted: YAML on/off are bools
            "train.optimizer=" + ("muon" if variant.startswith("deepwish-muon") else "adamw"),
            "train.parallel=" + ("fsdp" if variant == "deepwish-fsdp1" else "none"), "train.lr=3e-4"]
    if variant.startswith("deepwish-muon"):
        sets.append("train.muon_backend=" + ("torch" if variant == "deepwish-muon-torch" else "auto"))
        sets.append(f"train.optimizer_overlap={str(variant == 'deepwish-muon-overlap').lower()}")
    sets += [SUFFIXES[m] for m in mods]
    return load_config(preset, sets)


def _one_rank_group_env() -> None:
    """torchrun's environment for a one-process group (deepwish-fsdp1), on a free local port."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def build_deepwish(preset: str, batch: int, seq: int, variant: str, packed_data: str | None = None):
    """(step() -> loss tensor, flops_per_token, info) for our trainer's step at this shape; info
    holds docs_per_row for deepwish-packed (batches from `packed_data`, see packed_batches)."""
    from deepwish.model import Transformer
    from deepwish.train import parallel
    from deepwish.train.loop import autocast_context
    from deepwish.train.loss import checked_target_count, lm_loss, resolve_loss_backend
    from deepwish.train.optim import build_optimizer
    from deepwish.train.profile import phase

    run_cfg = _run_config(preset, batch, seq, variant)
    tc = run_cfg.train
    if tc.parallel != "none":
        _one_rank_group_env()
    d = parallel.init_distributed(tc)
    device = d.device
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(run_cfg.model)
    step_model = parallel.parallelize(model, run_cfg, d)
    optimizer = build_optimizer(model, tc, distributed=d.active)
    backend = resolve_loss_backend(tc.loss_backend, device)
    V = run_cfg.model.vocab_size
    info = {}
    if variant_parts(variant)[0] == "deepwish-packed":
        batches, info["docs_per_row"] = packed_batches(batch, seq, device, data=packed_data, vocab_size=V)
    else:
        batches = [(torch.randint(0, V, (batch, seq), device=device), torch.randint(0, V, (batch, seq), device=device),
                    None, None)]
    n = batch * seq
    # each batch's target count, checked on a host copy as the training loop does (train/loop.py):
    # the fused loss then reads nothing back from the device
    checked = [checked_target_count(b[1].cpu(), V) for b in batches]
    turn = iter(range(1 << 62))

    def step() -> torch.Tensor:
        i = next(turn) % len(batches)
        with phase("forward_backward"):  # the loop's phase names (train/profile.py), for profile_train
            with autocast_context(device, tc.dtype):
                loss, _ = lm_loss(step_model, batches[i], tc, n, backend=backend, checked_targets=checked[i])
            loss.backward()
        with phase("clip"):
            parallel.clip_grad_norm(model.parameters(), tc.grad_clip, optimizer)
        with phase("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step, model.flops_per_token(seq), info


def packed_batches(batch: int, seq: int, device, count: int = 8, data: str | None = None,
                   vocab_size: int | None = None) -> tuple[list[tuple], float]:
    """The first `count` batches `deepwish train` would draw (PackedLoader, seed 0) from `data` (a
    directory `deepwish data build` wrote: its train.bin) or, without it, from the embedded
    corpus's default shards, moved to the device as the trainer moves them (`to_device`: doc ids
    dropped from batches whose rows each hold one document); and the mean number of documents per
    row, which decides what the variant measures: the embedded corpus is eleven plays, so its
    2,048-token rows are nearly all one document (the plain causal path), where a corpus of many
    short files packs several per row. Ids must fit the model's vocabulary (`vocab_size`)."""
    from deepwish.data import PackedLoader, ensure_default_data
    from deepwish.train.loop import to_device
    train_bin = ensure_default_data()[0] if data is None else packed_train_bin(data)
    loader = PackedLoader(train_bin, seq, batch, seed=0)
    if vocab_size is not None and loader.header.vocab_size > vocab_size:
        raise ValueError(f"{train_bin}: its tokenizer's vocabulary ({loader.header.vocab_size}) is larger than the "
                         f"model's ({vocab_size}); ids past the embedding table")
    it = iter(loader)
    host = [next(it) for _ in range(count)]
    docs = [len(torch.unique(row)) for b in host for row in b[2]]
    return [to_device(b, device) for b in host], sum(docs) / len(docs)


def packed_train_bin(data: str) -> Path:
    """`data`'s train.bin (a directory `deepwish data build` wrote), or FileNotFoundError naming it."""
    train_bin = Path(data) / "train.bin"
    if not train_bin.is_file():
        raise FileNotFoundError(f"--packed-data {data}: no train.bin there (a directory `deepwish data build` "
                                f"wrote is expected)")
    return train_bin


def hf_config(model_cfg):
    """transformers config object for our ModelConfig, through the family's HF table."""
    import importlib

    import transformers

    from deepwish.hf.io import FAMILY_OF_CONFIG

    d = importlib.import_module(FAMILY_OF_CONFIG[model_cfg.family]).config_to_hf(model_cfg)
    d = {k: v for k, v in d.items() if k not in ("architectures", "dtype", "torch_dtype")}
    return transformers.AutoConfig.for_model(d.pop("model_type"), **d)


class Skipped(Exception):
    """A variant that cannot run here (a missing optional library); reported, not an error."""


def apply_liger(model_type: str) -> None:
    """Liger's kernels patched into transformers' classes for `model_type` (before the model is built)."""
    try:
        import liger_kernel.transformers as liger
    except Exception as e:  # noqa: BLE001 - any import failure means the variant cannot run
        raise Skipped(f"liger_kernel is not importable ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")
    patches = {"qwen3": "apply_liger_kernel_to_qwen3"}
    if model_type not in patches:
        raise Skipped(f"no Liger patch wired for HF model type {model_type!r} (only {', '.join(patches)})")
    getattr(liger, patches[model_type])(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                        fused_linear_cross_entropy=True)


def build_hf(preset: str, batch: int, seq: int, liger: bool = False):
    import transformers

    from deepwish.config import load_config

    cfg = load_config(preset).model
    device = torch.device("cuda")
    if liger:
        apply_liger(hf_config(cfg).model_type)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(cfg), attn_implementation="sdpa",
                                                          dtype=torch.float32).to(device)
    model.train()
    x = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)

    def loss() -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return model(input_ids=x, labels=x).loss

    return anchor_step(model, loss), model_flops_per_token(cfg, seq)


def anchor_step(model, loss_fn):
    """One training step of an anchor (HF, torchtitan) as its users run it: loss_fn()'s backward,
    clipping at 1.0, a fused AdamW step. Returns step() -> the loss (detached)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), fused=True)

    def step() -> torch.Tensor:
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


# deepwish preset -> torchtitan's Qwen3 flavour of the same shape (torchtitan/models/qwen3)
TORCHTITAN_FLAVORS = {"qwen3_0.6b": "0.6B", "qwen3_8b": "8B"}


# torchtitan 0.2's model packages import its data and logging components when they load
# (`datasets` for its Hugging Face loaders, `torch.utils.tensorboard` for its metrics), which the
# bench never calls and the GPU machine lacks. While torchtitan imports, those that cannot be
# imported are inert stand-ins (a name from them fails when used, saying so), removed again after.
TORCHTITAN_UNUSED_IMPORTS = ("datasets", "datasets.distributed", "torch.utils.tensorboard")


class _StandIn(types.ModuleType):
    """A module torchtitan imports but the bench never uses: every name is a class that refuses
    to be made."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        module = self.__name__

        def refuse(*args, **kwargs):
            raise RuntimeError(f"{module}.{name}: a stand-in (bench/train.py TORCHTITAN_UNUSED_IMPORTS), "
                               f"not the real module, which this machine lacks")
        return type(name, (), {"__init__": refuse, "__call__": refuse})


@contextlib.contextmanager
def stand_ins_for_absent(names: tuple[str, ...]):
    """Within: each module of `names` that cannot be imported is a `_StandIn` in sys.modules."""
    added = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            sys.modules[name] = _StandIn(name)
            added.append(name)
    try:
        yield added
    finally:
        for name in added:
            sys.modules.pop(name, None)


def torchtitan_qwen3(flavor: str, seq: int, device: torch.device):
    """torchtitan's own Qwen3 of `flavor`, built on the meta device and initialised on `device`
    its way; returns (model, logits(x) under bf16 autocast). torchtitan 0.3 (qwen3_configs):
    FlexAttention with the causal mask it builds every batch (it has no SDPA path); torchtitan 0.2
    (qwen3_args, Qwen3Model): its default SDPA attention, causal."""
    def why(e: Exception) -> str:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    try:
        from torchtitan.models.qwen3 import qwen3_configs  # torchtitan 0.3
        tt_cfg = qwen3_configs[flavor](attn_backend="flex")
        build, init = tt_cfg.build, "init_states"

        def forward(model, x: torch.Tensor) -> torch.Tensor:
            positions = torch.arange(x.shape[1], device=x.device).expand_as(x)
            return model(x, positions, model.get_attention_masks(positions))
    except Exception as e03:  # noqa: BLE001 - any import failure: try the other release's API
        try:
            with stand_ins_for_absent(TORCHTITAN_UNUSED_IMPORTS):
                from torchtitan.models.qwen3 import Qwen3Model, qwen3_args  # torchtitan 0.2
        except Exception as e02:  # noqa: BLE001 - neither: the variant cannot run
            raise Skipped(f"torchtitan is not importable (as 0.3: {why(e03)}; as 0.2: {why(e02)})") from None
        args = dataclasses.replace(qwen3_args[flavor], max_seq_len=max(seq, qwen3_args[flavor].max_seq_len))
        build, init = (lambda: Qwen3Model(args)), "init_weights"

        def forward(model, x: torch.Tensor) -> torch.Tensor:
            return model(x)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = build()
    model.to_empty(device=device)
    with torch.no_grad():
        getattr(model, init)(buffer_device=device)

    def logits(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return forward(model, x)
    return model, logits


def build_torchtitan(preset: str, batch: int, seq: int, device: torch.device | None = None):
    """torchtitan's own Qwen3 (its config of the same shape, `torchtitan_qwen3`) trained the way
    its single-device trainer does: fp32 parameters under bf16 autocast, each TransformerBlock
    compiled (fullgraph, as torchtitan's apply_compile), fp32 cross-entropy, clipping, fused AdamW.
    Not its Trainer (data loading, checkpointing, logging): the model, its compile and its precision."""
    if preset not in TORCHTITAN_FLAVORS:
        raise Skipped(f"no torchtitan flavour wired for {preset} (only {', '.join(TORCHTITAN_FLAVORS)})")
    from deepwish.config import load_config

    cfg = load_config(preset).model
    device = device or torch.device("cuda")
    model, logits = torchtitan_qwen3(TORCHTITAN_FLAVORS[preset], seq, device)
    n_ours = sum(p.numel() for p in _meta_deepwish(cfg).parameters())
    n_tt = sum(p.numel() for p in model.parameters())
    if n_tt != n_ours:
        raise RuntimeError(f"torchtitan's {TORCHTITAN_FLAVORS[preset]} has {n_tt:,} parameters, {preset} {n_ours:,}")
    if device.type == "cuda":
        for block in model.layers.values():
            block.compile(fullgraph=True)
    model.train()
    x = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)

    def loss() -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits(x).flatten(0, 1).float(), x.flatten())

    return anchor_step(model, loss), model_flops_per_token(cfg, seq)


def _meta_deepwish(model_cfg):
    from deepwish.model import Transformer
    with torch.device("meta"):
        return Transformer(model_cfg)


def model_flops_per_token(model_cfg, seq: int) -> float:
    """The count the trainer logs (Transformer.flops_per_token), from a meta-device model: the
    same FLOPs for HF as for ours at the same shape."""
    return _meta_deepwish(model_cfg).flops_per_token(seq)


# ---- timing ----------------------------------------------------------------------------------------
def build_variant(preset: str, batch: int, seq: int, variant: str, packed_data: str | None = None):
    """(step, FLOPs per token, info) of one variant: the anchors (hf, hf-liger, torchtitan; info {})
    or deepwish's (build_deepwish). What `measure` times and `bench profile_train` profiles."""
    variant_parts(variant)  # an unknown name is refused, not built as the nearest prefix ("hf-ligr" as hf)
    if variant.startswith("hf"):
        return (*build_hf(preset, batch, seq, liger=variant == "hf-liger"), {})
    if variant == "torchtitan":
        return (*build_torchtitan(preset, batch, seq), {})
    return build_deepwish(preset, batch, seq, variant, packed_data)


def measure(preset: str, variant: str, batch: int, seq: int, steps: int, warmup: int,
            packed_data: str | None = None) -> Result:
    """Build, warm up and time one variant; out-of-memory becomes status 'OOM'."""
    res = Result(preset, variant, batch, seq, "ok")
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    res.resident_gib_before = torch.cuda.memory_allocated() / 2**30
    failure = None
    try:
        step, fpt, info = build_variant(preset, batch, seq, variant, packed_data)
        res.docs_per_row = info.get("docs_per_row")
        peak, _ = device_peak_flops(torch.device("cuda"))
        t0 = time.perf_counter()
        first = float(step())
        res.first_step_s = time.perf_counter() - t0
        for _ in range(warmup - 1):
            step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        losses = [step() for _ in range(steps)]
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        res.tok_s = steps * batch * seq / dt
        res.step_ms = 1e3 * dt / steps
        res.mfu = mfu(res.tok_s, fpt, peak)
        res.peak_gib = torch.cuda.max_memory_allocated() / 2**30
        res.loss_first, res.loss_last = first, float(losses[-1])
    except torch.OutOfMemoryError:
        failure = "OOM"
    except Skipped as e:
        failure = f"skipped: {e}"
    except Exception as e:  # noqa: BLE001 - one failing variant is reported, the others still run
        failure = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    if failure is not None:  # outside the except block, so the traceback's frames are gone
        res.status = failure
        res.peak_gib = torch.cuda.max_memory_allocated() / 2**30
    step = None
    from deepwish.train.parallel import shutdown
    shutdown()
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(k, None)
    gc.collect()
    torch.cuda.empty_cache()
    return res


def run_preset(preset: str, variants: list[str], batch: int, seq: int, steps: int, warmup: int,
               packed_data: str | None = None) -> list[Result]:
    out = []
    for v in variants:
        print(f"[bench] {preset} {v} batch {batch} seq {seq} ...", flush=True)
        r = measure(preset, v, batch, seq, steps, warmup, packed_data)
        if v.startswith("hf") and r.status == "OOM" and batch > 1:
            out.append(r)
            print(f"[bench] {preset} {v} OOM at batch {batch}; trying batch {batch // 2}", flush=True)
            r = measure(preset, v, batch // 2, seq, steps, warmup, packed_data)
        out.append(r)
        print(f"[bench]   {_fmt(r)}", flush=True)
    return out


def _pct(x: float | None) -> str:
    return "  n/a" if x is None else f"{100 * x:5.1f}%"


def _fmt(r: Result) -> str:
    if r.status != "ok":
        return f"{r.variant:19s} b{r.batch:<3d} {r.status}"
    docs = "" if r.docs_per_row is None else f"  {r.docs_per_row:.2f} docs/row"
    return (f"{r.variant:19s} b{r.batch:<3d} {r.tok_s / 1e3:8.1f}k tok/s  {r.step_ms:8.1f} ms/step  MFU {_pct(r.mfu)}  "
            f"peak {r.peak_gib:6.1f} GiB  first step {r.first_step_s:6.1f} s  loss {r.loss_first:.3f}->{r.loss_last:.3f}"
            + docs)


def verdicts(preset: str, results: list[Result]) -> list[str]:
    """Goal checks of the issue for one preset, as printable lines."""
    goal = GOALS.get(preset)
    ours = [r for r in results if r.variant.startswith("deepwish") and r.status == "ok"]
    if goal is None or not ours:
        return []
    best = max(ours, key=lambda r: r.tok_s)
    lines = [f"{preset}: best deepwish {best.variant} b{best.batch} {best.tok_s / 1e3:.1f}k tok/s, MFU {_pct(best.mfu)}"]
    hf_ok = [r for r in results if r.variant == "hf" and r.status == "ok"]
    hf = max(hf_ok, key=lambda r: r.tok_s) if hf_ok else None
    if "tok_s" in goal:
        lines.append(f"  goal >= {goal['tok_s'] / 1e3:.0f}k tok/s: {'MET' if best.tok_s >= goal['tok_s'] else 'NOT met'}; "
                     f"goal MFU >= {100 * goal['mfu']:.0f}%: {'MET' if (best.mfu or 0) >= goal['mfu'] else 'NOT met'}")
    if "hf_ratio" in goal:
        base = hf.tok_s if hf else goal["hf_anchor_tok_s"]
        src = f"HF measured here b{hf.batch}" if hf else "HF anchor from GPU.md"
        lines.append(f"  goal >= {goal['hf_ratio']:.0f}x HF ({src}: {base / 1e3:.1f}k): {best.tok_s / base:.2f}x, "
                     f"{'MET' if best.tok_s >= goal['hf_ratio'] * base else 'NOT met'}")
    # the anchors train random ids with AdamW: `deepwish` is the like-for-like row when it ran, with
    # its suffixed forms (the residual stream in bf16 as torchtitan's FSDP2 bf16 parameters give;
    # inductor's launch configs tuned)
    sames = [r for r in ours if variant_parts(r.variant)[0] == "deepwish"] or [best]
    for variant, label, want in (("hf-liger", "HF + Liger", 2.0), ("torchtitan", "torchtitan", 1.2)):
        ok = [r for r in results if r.variant == variant and r.status == "ok"]
        for same in sames if ok else ():
            a = max(ok, key=lambda r: r.tok_s)
            ratio = same.tok_s / a.tok_s
            lines.append(f"  {same.variant} vs {label} measured here (b{a.batch}): {ratio:.2f}x (goal >= {want:g}x: "
                         f"{'MET' if ratio >= want else 'NOT met'})")
    if hf is not None:
        lines.append(f"  vs HF measured here (b{hf.batch}): {best.tok_s / hf.tok_s:.2f}x (GPU.md anchor "
                     f"{goal['hf_anchor_tok_s'] / 1e3:.1f}k, {goal['note']})")
    by = {r.variant: r for r in ours}
    if "deepwish" in by:
        for v in ("deepwish-muon", "deepwish-muon-torch", "deepwish-muon-overlap"):
            if v in by:
                ratio = by[v].tok_s / by["deepwish"].tok_s
                lines.append(f"  {v} / deepwish (AdamW): {100 * ratio:.1f}% of its tok/s (goal >= 90%: "
                             f"{'MET' if ratio >= 0.9 else 'NOT met'})")
    return lines


def plot(results: list[Result], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = list(dict.fromkeys(r.preset for r in results))
    fig, axes = plt.subplots(1, len(presets), figsize=(6 * len(presets), 4), squeeze=False)
    for ax, preset in zip(axes[0], presets):
        rs = [r for r in results if r.preset == preset]
        labels = [f"{r.variant}\nb{r.batch}" for r in rs]
        vals = [r.tok_s / 1e3 if r.status == "ok" else 0.0 for r in rs]
        bars = ax.bar(range(len(rs)), vals, color=["C0" if r.variant.startswith("deepwish") else "C1" for r in rs])
        for b, r in zip(bars, rs):
            text = f"{r.tok_s / 1e3:.1f}k\n{_pct(r.mfu)} MFU" if r.status == "ok" else r.status[:12]
            ax.annotate(text, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=7)
        goal = GOALS.get(preset, {})
        if "tok_s" in goal:
            ax.axhline(goal["tok_s"] / 1e3, ls="--", color="C2", label="goal")
        if "hf_anchor_tok_s" in goal:
            ax.axhline(goal["hf_anchor_tok_s"] / 1e3, ls=":", color="C1", label="HF anchor (GPU.md)")
            if "hf_ratio" in goal:
                ax.axhline(goal["hf_ratio"] * goal["hf_anchor_tok_s"] / 1e3, ls="--", color="C2", label="goal")
        ax.set_xticks(range(len(rs)), labels, fontsize=7)
        ax.set_ylabel("k tokens/s")
        ax.set_title(f"{preset}, seq {rs[0].seq}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def environment() -> dict:
    from deepwish.bench.env import bench_environment
    cuda = torch.cuda.is_available()
    peak, note = device_peak_flops(torch.device("cuda")) if cuda else (None, "no GPU")
    return bench_environment("cuda" if cuda else "cpu", "deepwish bench train", peak_flops=peak, peak_source=note)


def preset_exists(name: str) -> bool:
    from deepwish.config import ConfigError, preset_path
    try:
        preset_path(name)
        return True
    except ConfigError:
        return False


# ---- scaling (torchrun, several GPUs) ---------------------------------------------------------------
def _train_run(out: Path, nproc: int, preset: str, batch: int, seq: int, steps: int, timeout: int,
               grad_accum: int = 1) -> dict:
    run_dir = out / f"gpus{nproc}_b{batch}x{grad_accum}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "deepwish", "train", "--preset", preset, "--out", str(run_dir)]
    sets = ["train.parallel=fsdp", f"train.batch_size={batch}", f"train.grad_accum={grad_accum}",
            f"train.seq_len={seq}", f"train.steps={steps}",
            "train.log_every=5", f"train.eval_every={steps}", f"train.save_every={steps}", "train.sample_tokens=0",
            "train.warmup_steps=20", "train.lr=1e-3"]  # a conservative AdamW rate for embeddings at this size
    for s in sets:
        cmd += ["--set", s]
    if run_dir.exists():
        import shutil
        shutil.rmtree(run_dir)
    print("[bench] " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    # Own session, so a timeout ends the launcher and every worker it started (they hold GPU memory).
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        (out / f"{run_dir.name}.log").write_text(log)
        return {"run": run_dir.name, "status": f"timeout after {timeout} s; see {run_dir.name}.log"}
    (out / f"{run_dir.name}.log").write_text(log)
    if proc.returncode != 0:
        return {"run": run_dir.name, "status": f"error (exit {proc.returncode}); see {run_dir.name}.log"}
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    tail = train[len(train) // 2:]  # after compilation and warm-up
    return {"run": run_dir.name, "status": "ok", "nproc": nproc, "batch_per_gpu": batch, "grad_accum": grad_accum,
            "global_batch": batch * nproc * grad_accum,
            "tok_s": sum(r["tok_s"] for r in tail) / len(tail), "mfu_per_gpu": sum(r["mfu"] or 0 for r in tail) / len(tail) / nproc,
            "peak_gib": max(r["peak_mem_gib"] for r in train), "wall_s": time.perf_counter() - t0,
            "loss": {r["step"]: r["loss"] for r in train},
            "val_loss": [r["val_loss"] for r in recs if r["kind"] == "val"]}


def run_scaling(out: Path, nproc: int, preset: str, batch: int, seq: int, steps: int, timeout: int) -> int:
    one = _train_run(out, 1, preset, batch * nproc, seq, steps, timeout)
    strong = _train_run(out, nproc, preset, batch, seq, steps, timeout)
    # Weak scaling: N times the global batch as N-fold accumulation, so the per-GPU micro-batch (and
    # the validation batch, which the small embedded val shard must fill) stays that of the strong run.
    weak = _train_run(out, nproc, preset, batch, seq, steps, timeout, grad_accum=nproc)
    report = {"env": environment(), "preset": preset, "seq": seq, "steps": steps, "runs": [one, strong, weak]}
    if one["status"] == "ok":
        for r, name in ((strong, "strong"), (weak, "weak")):
            if r["status"] == "ok":
                report[f"{name}_efficiency"] = r["tok_s"] / (nproc * one["tok_s"])
        if strong["status"] == "ok":
            diffs = [abs(strong["loss"][s] - one["loss"][s]) for s in one["loss"] if s in strong["loss"]]
            report["strong_max_loss_diff"] = max(diffs)
            report["strong_final_loss"] = (one["loss"][max(one["loss"])], strong["loss"][max(strong["loss"])])
    (out / "scaling.json").write_text(json.dumps(report, indent=1))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in (one, strong, weak):
        if r["status"] == "ok":
            xs = sorted(r["loss"])
            ax.plot(xs, [r["loss"][s] for s in xs], label=f"{r['nproc']} GPU x b{r['batch_per_gpu']} x{r['grad_accum']} "
                                                         f"({r['tok_s'] / 1e3:.0f}k tok/s)")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_title(f"{preset} FSDP2, seq {seq}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=120)
    print("\nrun              status  tok/s      per-GPU MFU  peak GiB  final loss")
    for r in (one, strong, weak):
        if r["status"] != "ok":
            print(f"{r['run']:16s} {r['status']}")
            continue
        print(f"{r['run']:16s} ok      {r['tok_s'] / 1e3:7.1f}k  {100 * r['mfu_per_gpu']:6.1f}%     {r['peak_gib']:6.1f}    "
              f"{r['loss'][max(r['loss'])]:.4f}")
    for k in ("strong_efficiency", "weak_efficiency", "strong_max_loss_diff"):
        if k in report:
            print(f"{k}: {report[k]:.4f}")
    return 0


# ---- entry point -------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="deepwish bench train", description=doc_summary(__doc__))
    p.add_argument("--out", default="reports/bench_train", help="directory for results.json and the plot")
    p.add_argument("--preset", action="append", default=None,
                   help="preset(s) to benchmark (repeatable; default qwen3_0.6b)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (the first compiles)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated subset of {', '.join(VARIANTS)}")
    p.add_argument("--scaling", type=int, default=0, metavar="N",
                   help="instead: the FSDP2 scaling runs on N GPUs against 1 GPU (batch = per-GPU batch)")
    p.add_argument("--timeout", type=int, default=240, help="seconds allowed per scaling run")
    p.add_argument("--packed-data", default=None, metavar="DIR",
                   help="deepwish-packed's batches from this corpus (a `deepwish data build` directory) instead of "
                        "the embedded one, whose rows are nearly all one document")
    args = p.parse_args(argv)
    if args.packed_data is not None:   # before any model is built
        try:
            packed_train_bin(args.packed_data)
        except FileNotFoundError as e:
            raise SystemExit(str(e)) from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    presets = args.preset or ["qwen3_0.6b"]
    if args.scaling:
        if torch.cuda.device_count() < args.scaling:
            raise SystemExit(f"--scaling {args.scaling} needs {args.scaling} GPUs; {torch.cuda.device_count()} visible")
        return run_scaling(out, args.scaling, presets[0], args.batch, args.seq, max(args.steps, 40), args.timeout)
    if not torch.cuda.is_available():
        raise SystemExit("deepwish bench train needs a CUDA GPU")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = []
    for v in variants:
        try:
            variant_parts(v)
        except ValueError:
            unknown.append(v)
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)} (a deepwish one may end in "
                         f"{', '.join('+' + m for m in SUFFIXES)}: {'; '.join(SUFFIXES.values())})")
    results: list[Result] = []
    skipped = []
    for preset in presets:
        if not preset_exists(preset):
            print(f"[bench] note: preset {preset!r} does not exist yet; skipped", flush=True)
            skipped.append(preset)
            continue
        results += run_preset(preset, variants, args.batch, args.seq, args.steps, args.warmup, args.packed_data)
    doc = {"env": environment(), "batch": args.batch, "seq": args.seq, "steps": args.steps, "warmup": args.warmup,
           "packed_data": args.packed_data,
           "skipped_presets": skipped, "goals": GOALS, "results": [dataclasses.asdict(r) for r in results]}
    (out / "results.json").write_text(json.dumps(doc, indent=1))
    if results:
        plot(results, out / "train_throughput.png")
    print(f"\n{doc['env']['device']} | torch {torch.__version__} | seq {args.seq} | {args.steps} timed steps "
          f"| MFU peak {doc['env']['peak_source']}")
    for r in results:
        print(f"{r.preset:18s} {_fmt(r)}")
    for preset in dict.fromkeys(r.preset for r in results):
        for line in verdicts(preset, [r for r in results if r.preset == preset]):
            print(line)
    print(f"results: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
