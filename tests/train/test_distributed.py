"""Data parallelism on CPU: 2 processes under torchrun (gloo) against one process.

- FSDP2 and DDP (with gradient accumulation) reproduce the single-process losses of the same
  global batch, step by step (and FSDP2 the same validation loss, with sharded EMA weights);
- DCP checkpoints reshard: saved by 2 FSDP2 ranks, resumed by 1 plain process; a single-device
  checkpoint resumed by 2 FSDP2 ranks; both continue the reference run's losses; a DCP
  checkpoint converts to one HF directory;
- DistributedMuon (sharded and replicated parameters, same-shape buckets, a rank with an empty
  shard) equals Muon on whole matrices, and the
  model's forward with targets (the loss inside the forward, tied embeddings) gives
  single-process gradients under FSDP2 and DDP;
- activation checkpointing (selective, full) and activation offload leave the losses unchanged;
- DeepSeek-V3 (MLA, MoE with bias balancing, MTP) under DDP matches one process; expert loads
  are summed over ranks and logged per layer.
"""
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from deepwish.config import load_config
from deepwish.train import loop

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1", "model.head_dim=16",
        "model.d_ff=64", "train.seq_len=32", "train.eval_batches=2", "train.sample_tokens=0", "train.log_every=1",
        "train.warmup_steps=2", "train.steps=6", "train.save_every=3", "train.eval_every=6", "train.lr=0.02",
        "train.muon_lr=0.05", "train.weight_decay=0.01", "train.ema_decay=0.9"]
GLOBAL_BATCH = 4
# fp32 on CPU; sharded reductions change the summation order only.
LOSS_TOL = 2e-5


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def torchrun(nproc: int, args: list[str], timeout: int = 120) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    out = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise AssertionError(f"torchrun failed ({out.returncode}):\n{out.stdout[-4000:]}\n{out.stderr[-8000:]}")
    return out.stdout + out.stderr


def train_args(out_dir: Path, *extra: str) -> list[str]:
    sets = [a for kv in [*TINY, *extra] for a in ("--set", kv)]
    return ["-m", "deepwish", "train", "--preset", "qwen3_tiny", "--out", str(out_dir), *sets]


def logged(run_dir: Path, kind: str = "train", key: str = "loss") -> dict[int, float]:
    """{step: value} of one metric from metrics.jsonl."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == kind:
            out[rec["step"]] = rec[key]
    return out


def assert_same_losses(got: dict[int, float], ref: dict[int, float], steps) -> None:
    for s in steps:
        assert abs(got[s] - ref[s]) <= LOSS_TOL * abs(ref[s]), (s, got[s], ref[s])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, batch GLOBAL_BATCH: the run every parallel run must reproduce."""
    run = tmp_path_factory.mktemp("ref") / "run"
    cfg = load_config("qwen3_tiny", TINY + [f"train.batch_size={GLOBAL_BATCH}", f"train.out_dir={run}"])
    summary = loop.train(cfg, progress_bar=False)
    losses = logged(run)
    assert len(losses) == 6 and losses[6] < losses[1] - 0.05, losses  # it learns: the comparison has teeth
    return run, losses, summary["final_val_loss"]


def test_fsdp_two_ranks_match_one_process_convert_and_resume_on_one_rank(reference, tmp_path):
    from deepwish.hf.io import load_hf, save_hf
    from deepwish.weights import load_model, load_weights

    ref_run, ref_losses, ref_val = reference
    run = tmp_path / "fsdp"
    # offload=params: FSDP2's CPUOffloadPolicy (on a CPU-only host it exercises the path, not the copies)
    torchrun(2, train_args(run, f"train.batch_size={GLOBAL_BATCH // 2}", "train.offload=params") + ["--parallel", "fsdp"])
    assert_same_losses(logged(run), ref_losses, range(1, 7))
    # Muon and Adam hardly see a wrong gradient scale; the logged global gradient norm does.
    assert_same_losses(logged(run, key="grad_norm"), logged(ref_run, key="grad_norm"), range(1, 7))
    assert abs(logged(run, "val", "val_loss")[6] - ref_val) <= LOSS_TOL * ref_val
    meta = json.loads((run / "checkpoints" / "step_00000003" / "meta.json").read_text())
    assert meta["kind"] == "dcp" and meta["world_size"] == 2
    assert (run / "checkpoints" / "latest").read_text() == "step_00000006"

    # The sharded checkpoint (model and sharded EMA) converts to one HF directory, in one process.
    state, _ = load_weights(run)
    hf = load_hf(save_hf(load_model(run), tmp_path / "hf", dtype=torch.float32)).state_dict()
    assert set(state) == set(hf) and all(torch.equal(hf[k], v) for k, v in state.items())
    ema, _ = load_weights(run, ema=True)
    assert set(ema) == set(state) and any(not torch.equal(ema[k], state[k]) for k in ema)

    # 2 -> 1: the step-3 sharded checkpoint continues in one plain process with the same global batch.
    cfg = load_config("qwen3_tiny", TINY + [f"train.batch_size={GLOBAL_BATCH}", f"train.out_dir={run}"])
    resumed = loop.train(cfg, resume=str(run / "checkpoints" / "step_00000003"), progress_bar=False)
    assert resumed["start_step"] == 3
    assert_same_losses(resumed["train_losses"], ref_losses, range(4, 7))

    # A different global batch cannot continue the data order: refused, naming both.
    cfg = load_config("qwen3_tiny", TINY + ["train.batch_size=2", f"train.out_dir={run}"])
    with pytest.raises(ValueError, match="global batch"):
        loop.train(cfg, resume=str(run / "checkpoints" / "step_00000003"), progress_bar=False)


def test_ddp_two_ranks_with_accumulation_and_selective_recompute_match_one_process(reference, tmp_path):
    ref_run, ref_losses, _ = reference
    run = tmp_path / "ddp"
    # 2 ranks x 1 sequence x 2 micro-batches: the same 4 windows per step as the reference.
    torchrun(2, train_args(run, "train.parallel=ddp", "train.batch_size=1", "train.grad_accum=2",
                           "train.activation_checkpoint=selective"))
    assert_same_losses(logged(run), ref_losses, range(1, 7))
    assert_same_losses(logged(run, key="grad_norm"), logged(ref_run, key="grad_norm"), range(1, 7))


def test_single_device_checkpoint_resumes_on_two_fsdp_ranks_with_recompute_and_offload(reference, tmp_path):
    ref_run, ref_losses, _ = reference
    run = tmp_path / "one_to_two"
    shutil.copytree(ref_run, run)
    (run / "metrics.jsonl").unlink()
    # No --preset: the run's saved config, with the scale-out settings changed on the command line.
    sets = ["train.parallel=fsdp", f"train.batch_size={GLOBAL_BATCH // 2}", "train.activation_checkpoint=full",
            "train.offload=activations"]
    torchrun(2, ["-m", "deepwish", "train", "--resume", str(run / "checkpoints" / "step_00000003"),
                 *[a for kv in sets for a in ("--set", kv)]])
    assert_same_losses(logged(run), ref_losses, range(4, 7))
    # What it wrote is a sharded checkpoint of an FSDP2 run.
    meta = json.loads((run / "checkpoints" / "step_00000006" / "meta.json").read_text())
    assert meta["kind"] == "dcp" and meta["config"]["train"]["parallel"] == "fsdp"


def test_compiled_recomputed_offloaded_blocks_match_eager_on_one_process(reference, tmp_path):
    """Per-block torch.compile (inductor on CPU) around full recomputation, inside activation
    offload: the composition train/parallel.py builds on a GPU, checked against the eager run."""
    _, ref_losses, _ = reference
    cfg = load_config("qwen3_tiny", TINY + [f"train.batch_size={GLOBAL_BATCH}", f"train.out_dir={tmp_path / 'c'}",
                                            "train.compile='on'", "train.activation_checkpoint=full",
                                            "train.offload=activations", "train.steps=3", "train.eval_every=3"])
    got = loop.train(cfg, progress_bar=False)["train_losses"]
    # Losses 1..3 depend on the warm-up updates only, which a 3-step schedule shares with the 6-step one.
    for s in (1, 2, 3):  # inductor may reorder fp32 sums
        assert abs(got[s] - ref_losses[s]) <= 1e-4 * ref_losses[s], (s, got[s], ref_losses[s])


def test_deepseek_v3_under_ddp_matches_one_process_and_logs_summed_expert_loads(tmp_path):
    """MLA, sigmoid group-limited MoE with aux-loss-free bias updates (from the step's expert
    loads: they must be summed over ranks and micro-batches, MTP block included), MTP head unused
    at λ = 0 in some configurations (DDP static graph), gradient accumulation."""
    sets = ["model.n_layers=2", "train.seq_len=32", "train.steps=3", "train.log_every=1", "train.eval_every=3",
            "train.save_every=3", "train.sample_tokens=0", "train.warmup_steps=1", "train.lr=0.02",
            "train.muon_lr=0.05"]
    one = loop.train(load_config("deepseek_v3_tiny", sets + ["train.batch_size=4", f"train.out_dir={tmp_path / 'one'}"]),
                     progress_bar=False)
    run = tmp_path / "ddp"
    torchrun(2, ["-m", "deepwish", "train", "--preset", "deepseek_v3_tiny", "--out", str(run),
                 *[a for kv in sets + ["train.batch_size=1", "train.grad_accum=2", "train.parallel=ddp"]
                   for a in ("--set", kv)]])
    assert_same_losses(logged(run), one["train_losses"], range(1, 4))
    cfg = load_config("deepseek_v3_tiny", sets).model
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    moe = [r for r in recs if r["kind"] == "moe"]
    assert [r["step"] for r in moe] == [1, 2, 3]
    for r in moe:
        assert r["layers"] == [1, 2]  # first_k_dense=1; layer 2 is the MTP block's MoE
        for layer, counts in zip(r["layers"], r["tokens_per_expert"]):
            assert len(counts) == cfg.n_experts
            assert sum(counts) == 4 * 32 * cfg.n_experts_per_tok  # both ranks' tokens, k choices each
            mean = sum(counts) / len(counts)
            assert r[f"layer{layer}/max_load"] == pytest.approx(max(counts) / mean)
            assert r[f"layer{layer}/min_load"] == pytest.approx(min(counts) / mean)


WORKER = textwrap.dedent('''
    import copy, sys
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    from deepwish.config import load_config
    from deepwish.model import Objective, Transformer
    from deepwish.train.optim import DistributedMuon, Muon
    from deepwish.train.parallel import init_distributed, parallelize, shutdown

    def rel(ref, out):
        return float((ref.double() - out.double()).norm() / ref.double().norm())

    seed = int(sys.argv[1])
    cfg = load_config("qwen3_tiny", sys.argv[2:] + ["train.parallel=fsdp"])
    d = init_distributed(cfg.train)
    rank, world = d.rank, d.world_size
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(seed)  # the same fresh tensors on every rank

    # ---- DistributedMuon == Muon on whole matrices (uneven shards, a 3-D stack, a replica) ----
    # Same-shape matrices share a batched Newton-Schulz and their owners alternate; (16, 12) is replicated.
    shapes = [(7, 5), (5, 9), (3, 6, 4), (16, 12), (7, 5), (7, 5), (3, 6, 4), (16, 12), (16, 12), (1, 4)]
    replicated = {3, 7, 8}
    fulls = [torch.randn(s) for s in shapes]
    steps = [[torch.randn(s) for s in shapes] for _ in range(2)]
    ref = [nn.Parameter(f.clone()) for f in fulls]
    dp = [nn.Parameter(f.clone() if i in replicated else distribute_tensor(f.clone(), mesh, [Shard(0)]))
          for i, f in enumerate(fulls)]
    shardwise = [nn.Parameter(f.clone().tensor_split(world)[rank].clone()) for f in fulls[:2]]
    o_ref = Muon(ref, lr=0.05, weight_decay=0.1, ns_schedule="polar_express", normuon=True)
    o_dp = DistributedMuon(dp, lr=0.05, weight_decay=0.1, ns_schedule="polar_express", normuon=True)
    o_shard = Muon(shardwise, lr=0.05, weight_decay=0.1)
    for grads in steps:
        for p, g in zip(ref, grads):
            p.grad = g.clone()
        for p, g in zip(dp, grads):
            p.grad = distribute_tensor(g.clone(), mesh, [Shard(0)]) if isinstance(p, DTensor) else g.clone()
        for p, g in zip(shardwise, grads):
            p.grad = g.tensor_split(world)[rank].clone()
        o_ref.step(); o_dp.step(); o_shard.step()
    for r, p in zip(ref, dp):
        full = p.full_tensor() if isinstance(p, DTensor) else p.detach()
        assert rel(r.detach(), full) < 1e-5, ("muon", tuple(r.shape), rel(r.detach(), full))
    for r, p in zip(ref, shardwise):  # orthogonalising shards is a different update: the check has teeth
        assert rel(r.detach().tensor_split(world)[rank], p.detach()) > 1e-3, "shard-wise Muon matched?"

    # ---- the model's forward with targets under FSDP2 and DDP, tied embeddings ----
    base = Transformer(cfg.model)
    assert base.lm_head is None  # tied: the head is the embedding, used at both ends of the forward
    B, T, V = 2 * world, 16, cfg.model.vocab_size
    x = torch.randint(0, V, (B, T))
    t = torch.randint(0, V, (B, T))
    objective = Objective(loss_norm=float(t.numel()))  # the global target count, as the trainer passes it
    base(x, targets=t, objective=objective).loss.backward()
    mine = slice(rank * 2, rank * 2 + 2)
    for mode in ("fsdp", "ddp"):
        model = copy.deepcopy(base)
        model.zero_grad(set_to_none=True)
        step_model = parallelize(model, load_config("qwen3_tiny", sys.argv[2:] + [f"train.parallel={mode}"]), d)
        loss = step_model(x[mine], targets=t[mine], objective=objective).loss
        (loss * d.grad_scale).backward()
        for (name, p), (_, q) in zip(model.named_parameters(), base.named_parameters()):
            g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            assert rel(q.grad, g) < 1e-5, (mode, name, rel(q.grad, g))
    if rank == 0:
        print("WORKER OK")
    shutdown(wait_for_peers=True)  # the trainer's own end of a torchrun process
''')


def test_distributed_muon_and_fused_loss_entry_match_one_device(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = torchrun(2, [str(script), str(random.randrange(2**31)), *TINY[:6], "model.vocab_size=96"])
    assert "WORKER OK" in out


@pytest.mark.gpu
def test_fsdp_one_gpu_compiled_fused_loss_matches_plain_run(cuda, tmp_path):
    """On a GPU: FSDP2 (bf16 params) + per-block compile + fused loss under torchrun, one rank,
    with and without parameter offload to the CPU, against the plain single-device run (fp32
    params, autocast): bf16 tolerance."""
    plain = tmp_path / "plain"
    extra = ["train.batch_size=4", "train.steps=6", "train.loss_backend=auto"]
    torchrun(1, train_args(plain, *extra, "train.compile='off'"), timeout=600)
    run = tmp_path / "fsdp"
    torchrun(1, train_args(run, *extra, "train.parallel=fsdp", "train.compile='on'"), timeout=600)
    offload = tmp_path / "fsdp_offload"
    torchrun(1, train_args(offload, *extra, "train.parallel=fsdp", "train.compile='on'", "train.offload=params"),
             timeout=600)
    a = logged(plain)
    for other in (logged(run), logged(offload)):
        for s in range(1, 7):
            assert abs(a[s] - other[s]) <= 2e-2 * a[s], (s, a[s], other[s])


@pytest.mark.gpu
def test_bench_train_runs_every_variant_on_a_tiny_preset(cuda, tmp_path):
    """The benchmark end to end at toy size (a minute): every variant runs and is reported."""
    from deepwish.bench import train as bench

    assert bench.main(["--out", str(tmp_path), "--preset", "qwen3_tiny", "--batch", "4", "--seq", "256",
                       "--steps", "3", "--warmup", "2"]) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    by_variant = {r["variant"]: r for r in doc["results"]}
    for v in bench.VARIANTS:
        if v == "hf-liger" and by_variant[v]["status"].startswith("skipped: liger_kernel is not importable"):
            continue  # optional library absent on this machine: skipped with its reason
        assert by_variant[v]["status"] == "ok" and by_variant[v]["tok_s"] > 0, by_variant[v]
    assert (tmp_path / "train_throughput.png").stat().st_size > 1000


ZERO2_WORKER = textwrap.dedent('''
    import copy, sys
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from deepwish.config import load_config
    from deepwish.model import Objective, Transformer
    from deepwish.train.parallel import init_distributed, parallelize, shutdown

    sets = sys.argv[2:]
    d = init_distributed(load_config("qwen3_tiny", sets + ["train.parallel=fsdp"]).train)
    rank, world = d.rank, d.world_size
    torch.manual_seed(int(sys.argv[1]))
    base = Transformer(load_config("qwen3_tiny", sets).model)
    V = base.cfg.vocab_size
    x, t = torch.randint(0, V, (2 * world, 16)), torch.randint(0, V, (2 * world, 16))
    objective = Objective(loss_norm=float(t.numel()))
    base(x, targets=t, objective=objective).loss.backward()
    mine = slice(2 * rank, 2 * rank + 2)
    for reshard in (True, False):
        model = copy.deepcopy(base)
        model.zero_grad(set_to_none=True)
        cfg = load_config("qwen3_tiny", sets + ["train.parallel=fsdp", f"train.reshard_after_forward={reshard}"])
        step_model = parallelize(model, cfg, d)
        loss = step_model(x[mine], targets=t[mine], objective=objective).loss
        # Between forward and backward: ZeRO-3-like blocks hold only their shard again, ZeRO-2-like
        # blocks still hold the gathered (plain, full-size) parameters.
        for block, ref in zip(model.blocks, base.blocks):
            for p, q in zip(block.parameters(), ref.parameters()):
                assert isinstance(p, DTensor) == reshard, (reshard, type(p))
                if not reshard:
                    assert p.shape == q.shape
        (loss * d.grad_scale).backward()
        # After backward both are sharded: parameters, and gradients reduce-scattered to shards.
        for (name, p), q in zip(model.named_parameters(), base.parameters()):
            assert isinstance(p, DTensor) and isinstance(p.grad, DTensor), (reshard, name)
            assert p.grad.to_local().shape[0] <= (q.shape[0] + world - 1) // world, (name, p.grad.to_local().shape)
            g = p.grad.full_tensor()
            err = float((q.grad.double() - g.double()).norm() / q.grad.double().norm())
            assert err < 1e-5, (reshard, name, err)
    if rank == 0:
        print("ZERO2 OK")
    shutdown(wait_for_peers=True)  # the trainer's own end of a torchrun process
''')


def test_zero2_keeps_blocks_gathered_until_backward_with_sharded_gradients(tmp_path):
    script = tmp_path / "zero2.py"
    script.write_text(ZERO2_WORKER)
    out = torchrun(2, [str(script), str(random.randrange(2**31)), *TINY[:6], "model.vocab_size=96"])
    assert "ZERO2 OK" in out


def test_zero2_fsdp_two_ranks_match_one_process(reference, tmp_path):
    ref_run, ref_losses, ref_val = reference
    run = tmp_path / "zero2"
    out = torchrun(2, train_args(run, f"train.batch_size={GLOBAL_BATCH // 2}", "train.reshard_after_forward=false")
                   + ["--parallel", "fsdp"])
    assert "ZeRO-2-like" in out
    assert_same_losses(logged(run), ref_losses, range(1, 7))
    assert_same_losses(logged(run, key="grad_norm"), logged(ref_run, key="grad_norm"), range(1, 7))
    assert abs(logged(run, "val", "val_loss")[6] - ref_val) <= LOSS_TOL * ref_val


def test_zero2_setting_needs_fsdp():
    from deepwish.config import ConfigError, config_problems
    from deepwish.train import parallel

    cfg = load_config("qwen3_tiny", ["train.reshard_after_forward=false", "train.parallel=ddp"])
    assert any(p.startswith("train.reshard_after_forward=False") and "train.parallel=fsdp" in p
               for p in config_problems(cfg))
    with pytest.raises(ConfigError, match="reshard_after_forward=False: .*train.parallel=fsdp"):
        parallel.validate(cfg.train)
    assert not config_problems(load_config("qwen3_tiny", ["train.reshard_after_forward=false",
                                                          "train.parallel=fsdp"]))
