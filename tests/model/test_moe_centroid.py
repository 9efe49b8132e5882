"""The centroid router: cosine similarity of normalised tokens and learned centroids over a
temperature, top-k; with the Switch and sequence-wise balance losses, the aux-loss-free bias
update, group-limited routing, and inside a trained model."""
import dataclasses
import math

import pytest
import torch

from deepwish.config import ConfigError, load_config
from deepwish.model import Transformer
from deepwish.model.moe import MoE, centroid_scores, route_centroid


def _cos_loop(x, c):
    """Cosine similarity written out per pair, the oracle."""
    out = torch.empty(x.shape[0], c.shape[0], dtype=torch.float64)
    for n in range(x.shape[0]):
        for e in range(c.shape[0]):
            a, b = x[n].double(), c[e].double()
            out[n, e] = (a @ b) / (a.norm() * b.norm())
    return out


def test_scores_are_softmax_of_cosine_over_temperature():
    x, c = torch.randn(7, 12), torch.randn(5, 12)
    for tau in (1.0, 0.1):
        ref = (_cos_loop(x, c) / tau).softmax(-1)
        got = centroid_scores(x, c, tau)
        assert got.dtype == torch.float32 and torch.allclose(got.double(), ref, atol=1e-6)
    # Only directions count: scaling tokens or centroids changes nothing.
    assert torch.allclose(centroid_scores(3.0 * x, c * (torch.rand(5, 1) + 0.1), 0.1), centroid_scores(x, c, 0.1),
                          atol=1e-6)
    # A lower temperature is sharper.
    assert centroid_scores(x, c, 0.05).max(-1).values.mean() > centroid_scores(x, c, 1.0).max(-1).values.mean()


def test_topk_weights_and_bias_picks_but_never_weights():
    x, c = torch.randn(16, 8), torch.randn(6, 8)
    zero = torch.zeros(6)
    w, idx, scores = route_centroid(x, c, zero, 0.2, 2, 1, 1, True, 1.0)
    ref = (_cos_loop(x, c) / 0.2).softmax(-1)
    top = ref.topk(2, dim=-1)
    assert torch.equal(idx, top.indices)
    assert torch.allclose(w.double(), top.values / top.values.sum(-1, keepdim=True), atol=1e-6)
    # Unnormalised and scaled: the chosen softmax scores times the factor.
    w2, _, _ = route_centroid(x, c, zero, 0.2, 2, 1, 1, False, 2.5)
    assert torch.allclose(w2.double(), 2.5 * top.values, atol=1e-6)
    # A large bias on expert 3 makes every token choose it, but its weight is still its score.
    bias = torch.zeros(6)
    bias[3] = 10.0
    w3, idx3, s3 = route_centroid(x, c, bias, 0.2, 2, 1, 1, False, 1.0)
    assert (idx3 == 3).any(-1).all()
    assert torch.allclose(w3, s3.gather(1, idx3)) and torch.equal(s3, scores)


def test_group_limited_routing_keeps_only_chosen_groups():
    torch.manual_seed(0)
    x, c = torch.randn(32, 8), torch.randn(8, 8)
    _, idx, scores = route_centroid(x, c, torch.zeros(8), 0.1, 2, 4, 1, True, 1.0)
    group_of = idx // 2
    assert (group_of[:, 0] == group_of[:, 1]).all()  # one group kept: both experts from it
    best_group = scores.view(32, 4, 2).sum(-1).argmax(-1)  # 2 experts per group: top-2 sum = group sum
    assert torch.equal(group_of[:, 0], best_group)


def _moe_cfg(**kw):
    base = dict(n_layers=2, d_model=32, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64, vocab_size=64,
                n_experts=8, n_experts_per_tok=2, d_ff_expert=16, router="centroid", router_temperature=0.1)
    return dataclasses.replace(load_config("qwen3_moe_tiny").model, **{**base, **kw})


def test_moe_forward_balance_losses_and_gradients_reach_the_centroids():
    cfg = _moe_cfg(router_aux_loss_coef=0.01, seq_aux_loss_coef=0.001, n_group=2, topk_group=1)
    moe = MoE(cfg, 0).train()
    x = torch.randn(2, 5, 32, requires_grad=True)
    y, stats = moe(x)
    assert y.shape == x.shape and int(stats["moe_load"].sum()) == 2 * 5 * 2
    assert stats["moe_aux"].ndim == 0 and stats["moe_aux"] > 0
    (y.square().sum() + stats["moe_aux"]).backward()
    g = moe.router.weight.grad
    assert g is not None and g.abs().sum() > 0 and torch.isfinite(g).all()
    # The output is Σ_k w_k·expert_k(x) with the router's weights, checked by hand for one token.
    flat = x.detach().reshape(-1, 32)
    w, idx, _ = moe.route(flat)
    n = 3
    ref = torch.zeros(32)
    for j in range(2):
        e = int(idx[n, j])
        gate, up = (moe.w_gate_up[e] @ flat[n]).chunk(2)
        ref += w[n, j] * (moe.w_down[e] @ (torch.nn.functional.silu(gate) * up))
    shared = moe.shared(flat[n:n + 1])[0] if moe.shared is not None else 0
    assert torch.allclose(y.detach().reshape(-1, 32)[n], ref.detach() + shared, atol=1e-5)


def test_bias_update_rebalances_centroid_routing():
    """Tokens leaning towards one centroid: the aux-loss-free bias step spreads them out."""
    torch.manual_seed(0)
    moe = MoE(_moe_cfg(), 0)
    with torch.no_grad():
        c0 = moe.router.weight[0] / moe.router.weight[0].norm()
        x = 0.6 * c0 + torch.randn(256, 32) / 32 ** 0.5  # cos(x, c0) ~ 0.5, the others ~ 0

    def load():
        return moe.route(x)[1].flatten().bincount(minlength=8).float()
    t = before = load()
    late = []
    for i in range(40):
        moe.update_correction_bias(t, 0.03)
        t = load()
        if i >= 30:
            late.append(t)
    after = torch.stack(late).mean(0)  # sign steps oscillate around balance: average the tail
    assert before[0] > 2 * before.mean(), before
    assert after[0] < 0.5 * before[0] and after.std() < 0.5 * before.std(), (before, after)


def test_trained_model_with_centroid_router_updates_biases(tmp_path):
    from deepwish.train import loop

    sets = ["model.router=centroid", "model.bias_update_rate=0.01", "model.router_aux_loss_coef=0.01",
            "model.n_layers=2", "model.d_model=64", "model.d_ff_expert=32", "train.seq_len=32", "train.batch_size=2",
            "train.steps=2", "train.eval_every=2", "train.save_every=2", "train.eval_batches=1", "train.sample_tokens=0", "train.warmup_steps=1",
            f"train.out_dir={tmp_path / 'run'}"]
    summary = loop.train(load_config("qwen3_moe_tiny", sets), progress_bar=False)
    assert all(math.isfinite(v) for v in summary["train_losses"].values())
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "step_00000002" / "model.pt", weights_only=True)
    biases = [v for k, v in ckpt.items() if k.endswith("e_score_correction_bias")]
    assert biases and all(b.abs().sum() > 0 for b in biases)  # the bias step ran for the centroid router


def test_config_checks():
    with pytest.raises(ConfigError, match="router='cosine' is not softmax, sigmoid or centroid"):
        load_config("qwen3_moe_tiny", ["model.router=cosine"])
    with pytest.raises(ConfigError, match="router_temperature=0.0 must be a finite number > 0"):
        load_config("qwen3_moe_tiny", ["model.router=centroid", "model.router_temperature=0"])
