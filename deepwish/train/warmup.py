"""Compile warm-up (train.compile_warmup): before the training clock starts, one forward and
backward at every shape the run's schedules will use, so that compilation (torch.compile graphs
of the blocks, Triton kernels, autotuning) is paid up front and reported apart from training
time, as modded-nanogpt's record runs do.

What makes a shape (each a separate graph or kernel specialisation):
- the step's row length, `seq_len_at` (train.seq_len_schedule), and with it the rows per
  micro-batch (the loader's rows split, schedule.split_rows);
- the window cap, `window_blocks_at` (train.window_warmup_frac): every distinct cap;
- whether the micro-batch carries document ids: rows that all hold one document drop them
  (loop.to_device), another graph, so both forms run at every (length, cap).
The run's steps start_step..total_steps are scanned; the first step of each distinct
(length, cap) stands for it (`warmup_plan`). The evaluation's forward (eval mode, no gradients,
the full row length) is a graph of its own too, rehearsed with both document-id forms. train.batch_schedule changes only how many
micro-batches a step takes, not their shape.

The warm-up changes nothing the run computes: a run with it takes exactly the steps of a run
without it (tests/train/test_warmup.py compares the weights):
- its batches are synthetic (token 0, targets 0), never the loader's: the data order is untouched;
- there is no optimizer step: parameters, optimizer state, EMA and router biases are untouched, and
  the gradients are set to None afterwards; the optimizer's own kernels (Muon's triton step:
  compilation, autotuning and its timed Newton–Schulz choice, about 20 s for Qwen3-0.6B on an H200)
  are warmed by a twin step on scratch tensors of every shape bucket (`Muon.warm_up`);
- the RNG states (python, numpy, torch CPU and CUDA) are restored afterwards, and so are the
  model's buffers (from a copy taken before).
On the GPU the compiled graphs a run then uses can differ from a run without warm-up (a window
cap seen twice is compiled as a dynamic size), which may change bf16 rounding, not the computation.
"""
from __future__ import annotations

import random
import time

import numpy as np
import torch

from deepwish.config import WINDOW_BLOCK
from deepwish.train.schedule import seq_len_at, window_blocks_at


def warmup_plan(tc, start_step: int, total_steps: int) -> list[tuple[int, int, int]]:
    """(step, row length, window cap) for the first step of every distinct (length, cap) the run
    meets from start_step on, in step order."""
    seen, plan = set(), []
    for step in range(start_step, total_steps):
        key = (seq_len_at(step, tc), window_blocks_at(step, tc, WINDOW_BLOCK))
        if key not in seen:
            seen.add(key)
            plan.append((step, *key))
    return plan


def synthetic_batch(rows: int, length: int, documents: int) -> tuple[torch.Tensor, ...]:
    """(input_ids, targets, doc_ids, positions) [rows, length] of token 0, each row cut into
    `documents` documents of (nearly) equal length."""
    doc = torch.arange(length) * documents // length  # 0 0 .. 1 1 .. : `documents` runs
    starts = torch.searchsorted(doc, doc, right=False)  # each position's document start
    positions = (torch.arange(length) - starts).expand(rows, length).contiguous()
    zeros = torch.zeros(rows, length, dtype=torch.long)
    return zeros, zeros.clone(), doc.to(torch.int32).expand(rows, length).contiguous(), positions


def _rng_state() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def _set_rng_state(state: tuple) -> None:
    py, npy, cpu, cuda = state
    random.setstate(py)
    np.random.set_state(npy)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def warm_up(run, forward_backward, total_steps: int, evaluation=None) -> dict:
    """One forward and backward per shape of `warmup_plan` up to `total_steps` (both document-id
    forms), through the loop's `forward_backward(run, micro, step, n_global)`; then, given
    `evaluation(batch)` (the loop's validation forward), the evaluation's own graphs (eval mode, no
    gradients, the full row length, both document-id forms), whose compilation would otherwise stall
    the first evaluation (~18 s for gpt_124m on an H200, reports/speedrun.md run 4); then everything
    restored (module doc).
    Logs a {"kind": "warmup"} record; returns it."""
    tc = run.cfg.train
    plan = warmup_plan(tc, run.start_step, total_steps)
    rng = _rng_state()
    buffers = {name: b.detach().clone() for name, b in run.model.named_buffers()}
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    t0 = time.perf_counter()
    passes = eval_passes = 0
    try:
        for step, length, _cap in plan:
            rows = tc.batch_size * tc.seq_len // length
            for documents in (1, 2):  # one document per row (no doc ids) and packed rows
                batch = synthetic_batch(rows, length, min(documents, length))
                forward_backward(run, [batch], step, n_global=rows * length * run.d.world_size)
                run.model.zero_grad(set_to_none=True)
                passes += 1
        if evaluation is not None:
            was_training = run.model.training
            run.model.eval()
            try:
                with torch.no_grad():
                    for documents in (1, 2):
                        evaluation(synthetic_batch(tc.batch_size, tc.seq_len, min(documents, tc.seq_len)))
                        eval_passes += 1
            finally:
                run.model.train(was_training)
        # the optimizer's own kernels (Muon's triton step: compile, autotune, its Newton–Schulz
        # choice) on scratch tensors of every shape bucket; its state is untouched
        buckets = run.optimizer.warm_up() if hasattr(run.optimizer, "warm_up") else 0
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)
    finally:
        run.model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name, b in run.model.named_buffers():
                b.copy_(buffers[name])
        _set_rng_state(rng)
    seconds = time.perf_counter() - t0
    rec = {"kind": "warmup", "step": run.start_step, "seconds": seconds, "passes": passes,
           "eval_passes": eval_passes, "optimizer_buckets": buckets,
           "shapes": [{"step": s, "seq_len": n, "window_blocks": c} for s, n, c in plan]}
    run.logger.write(rec)
    run.logger.print(f"[deepwish] compile warm-up: {passes} forward/backward passes over {len(plan)} scheduled "
                     f"shape(s), {eval_passes} evaluation forward(s), optimizer kernels for {buckets} shape "
                     f"bucket(s), in {seconds:.1f} s "
                     f"(not in the training clock, no optimizer step)")
    return rec
