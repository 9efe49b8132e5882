"""GPU checks of the GPT family in the trainer (pytest -m gpu tests/train/test_gpt_gpu.py -s): the
fused loss with the head's soft-cap, and a compiled run through the window schedule."""
import json

import pytest
import torch

from deepwish.config import TrainConfig, load_config, model_config
from deepwish.model import Transformer
from deepwish.train import loop
from deepwish.train.loss import count_targets, lm_loss


@pytest.mark.gpu
def test_fused_loss_applies_the_logit_softcap(cuda, rel_err):
    model = Transformer(model_config("gpt_tiny", logit_softcap=5.0)).to(cuda)
    ids = torch.randint(0, 2048, (2, 256), device=cuda)
    out = {}
    for backend in ("torch", "triton"):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = lm_loss(model, (ids, ids, None, None), TrainConfig(), count_targets(ids), backend=backend)
        loss.backward()
        out[backend] = (loss.detach().float(), model.lm_head.weight.grad.float().clone())
    assert rel_err(out["torch"][0], out["triton"][0]) < 1e-2
    assert rel_err(out["torch"][1], out["triton"][1]) < 5e-2


@pytest.mark.gpu
def test_compiled_gpt_tiny_learns_through_the_window_schedule(cuda, tmp_path):
    """Compiled blocks (per-layer windows, value-embedding layers) and a window cap that grows
    during the run: the run learns, and every window value the schedule takes is one graph."""
    cfg = load_config("gpt_tiny", [f"train.out_dir={tmp_path / 'run'}", "train.steps=60", "train.compile=on",
                                   "train.device=cuda", "train.window_warmup_frac=0.5", "train.eval_every=30",
                                   "train.save_every=60", "train.sample_tokens=0", "train.log_every=10"])
    s = loop.train(cfg, progress_bar=False)
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if r["kind"] == "train"]
    assert losses[-1] < losses[0] - 1.0, losses
    assert s["final_val_loss"] < 6.0
    tok_s = [r["tok_s"] for r in recs if r["kind"] == "train"]
    print(f"gpt_tiny compiled: tok/s {[round(x) for x in tok_s]}, final val {s['final_val_loss']:.4f}")


@pytest.mark.gpu
def test_compile_warmup_leaves_no_compilation_to_the_training_steps(cuda, tmp_path, monkeypatch):
    """train.compile_warmup compiles every shape the schedules use (window caps, sequence-length
    stages, rows with and without document ids) and the evaluation's forward before the clock: no
    graph is compiled during the training steps or the evaluations."""
    from torch._dynamo.utils import counters

    graphs = []
    real = loop.optimizer_step

    def counted(run, step, micro, meanwhile=None):
        before = counters["stats"]["unique_graphs"]
        out = real(run, step, micro, meanwhile)
        graphs.append((step, before, counters["stats"]["unique_graphs"]))
        return out

    monkeypatch.setattr(loop, "optimizer_step", counted)
    evals = []
    real_eval = loop.validation_loss

    def counted_eval(run):
        before = counters["stats"]["unique_graphs"]
        out = real_eval(run)
        evals.append((before, counters["stats"]["unique_graphs"]))
        return out

    monkeypatch.setattr(loop, "validation_loss", counted_eval)
    cfg = load_config("gpt_tiny", [f"train.out_dir={tmp_path / 'run'}", "train.steps=40", "train.compile=on",
                                   "train.device=cuda", "train.seq_len=512", "train.seq_len_schedule=[128,256,512]",
                                   "train.window_warmup_frac=0.8", "train.compile_warmup=true", "train.eval_every=20",
                                   "train.save_every=40", "train.sample_tokens=0", "train.log_every=10"])
    loop.train(cfg, progress_bar=False)
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    warm = [r for r in recs if r["kind"] == "warmup"][0]
    assert len(warm["shapes"]) >= 4 and warm["passes"] == 2 * len(warm["shapes"])
    new = [(s, b, a) for s, b, a in graphs if a != b]
    assert graphs[0][1] > 0 and not new, f"graphs compiled during training steps: {new} (warm-up {warm})"
    assert warm["eval_passes"] == 2 and evals and all(a == b for b, a in evals), f"graphs compiled in evaluations: {evals}"
    print(f"compile warm-up {warm['seconds']:.1f} s over {len(warm['shapes'])} shapes; "
          f"{graphs[0][1]} graphs, none during the {len(graphs)} steps")
