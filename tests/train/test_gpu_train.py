"""GPU checks of the trainer (run on the device machine: pytest -m gpu tests/train -s)."""
import pytest
import torch

from deepwish.config import TrainConfig, load_config, model_config
from deepwish.model import Transformer
from deepwish.train import loop
from deepwish.train.loss import count_targets, lm_loss, resolve_loss_backend

TINY = dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128, max_seq_len=256)


@pytest.mark.gpu
def test_fused_and_torch_loss_backends_agree_on_gpu(cuda, rel_err):
    assert resolve_loss_backend("auto", cuda) == "triton"
    model = Transformer(model_config("qwen3_tiny", **TINY)).to(cuda)
    B, T = 4, 128
    ids = torch.randint(0, 512, (B, T), device=cuda)
    targets = torch.randint(0, 512, (B, T), device=cuda)
    targets[:, :7] = -100
    batch = (ids, targets, None, None)
    out = {}
    for backend in ("torch", "triton"):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = lm_loss(model, batch, TrainConfig(z_loss=1e-4), count_targets(targets), backend=backend)
        loss.backward()
        out[backend] = (loss.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters()})
    assert rel_err(out["torch"][0], out["triton"][0]) < 1e-2
    for n, g in out["torch"][1].items():
        assert rel_err(g, out["triton"][1][n]) < 5e-2, n


@pytest.mark.gpu
def test_tiny_run_on_gpu_learns_and_reports_mfu(cuda, tmp_path, capsys):
    cfg = load_config("qwen3_tiny", [f"train.out_dir={tmp_path}", "train.steps=60", "train.eval_every=30",
                                     "train.log_every=10", "train.sample_tokens=16"])
    s = loop.train(cfg, progress_bar=False)
    out = capsys.readouterr().out
    print(out[-3000:])
    assert s["device"].startswith("cuda") and s["loss_backend"] == "triton"
    assert s["final_val_loss"] < s["unigram_entropy"]
    assert "MFU n/a" not in out and "GiB" in out


@pytest.mark.gpu
def test_overlapped_optimizer_step_equals_the_sequential_one(cuda):
    """train.optimizer_overlap: AdamW on a side stream beside Muon gives the sequential step's
    parameters bit for bit, over several steps (disjoint parameters, the same kernels)."""
    from deepwish.train.optim import build_optimizer
    torch.manual_seed(0)
    base = Transformer(model_config("qwen3_tiny", **TINY)).to(cuda)
    models, opts = [], []
    for overlap in (False, True):
        m = Transformer(model_config("qwen3_tiny", **TINY)).to(cuda)
        m.load_state_dict(base.state_dict())
        models.append(m)
        opts.append(build_optimizer(m, TrainConfig(optimizer="muon", weight_decay=0.1, optimizer_overlap=overlap)))
    assert opts[1]._overlap_device().type == "cuda" and opts[0]._overlap_device() is None
    for step in range(3):
        grads = {n: torch.randn_like(p) for n, p in base.named_parameters()}
        for m, opt in zip(models, opts):
            for n, p in m.named_parameters():
                p.grad = grads[n].clone()
            opt.step()
    for (n, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(a, b), n
