"""DeepSeekMoE: the sigmoid group-limited router against HF and against each known trap, the
layer pattern (first_k_dense), shared experts, the sequence-wise balance loss and the
aux-loss-free bias update."""
import pytest
import torch
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

from deepwish.config import load_config
from deepwish.model.moe import MoE, route_sigmoid_grouped, sequence_aux_loss


def route(logits, bias, k, G, kg, norm=True, scale=1.0):
    return route_sigmoid_grouped(logits, bias, k, G, kg, norm, scale)


@pytest.mark.parametrize("E,k,G,kg,norm,scale", [(8, 2, 2, 1, True, 2.5), (16, 4, 4, 2, False, 1.7),
                                                 (12, 3, 1, 1, True, 1.0), (32, 8, 8, 3, True, 2.5)])
def test_router_matches_hf(E, k, G, kg, norm, scale):
    d = 24
    cfg = DeepseekV3Config(hidden_size=d, n_routed_experts=E, num_experts_per_tok=k, n_group=G, topk_group=kg,
                           norm_topk_prob=norm, routed_scaling_factor=scale)
    hf = DeepseekV3TopkRouter(cfg)
    with torch.no_grad():
        hf.weight.normal_(0, 0.5)
        hf.e_score_correction_bias.normal_(0, 0.3)
    x = torch.randn(200, d)
    _, w_ref, i_ref = hf(x)
    logits = torch.nn.functional.linear(x, hf.weight)
    w, i, _ = route(logits, hf.e_score_correction_bias, k, G, kg, norm, scale)
    # HF's top-k is unsorted: compare as (index -> weight) maps per token
    o_ref, o = i_ref.sort(-1), i.sort(-1)
    assert torch.equal(o_ref.values, o.values)
    assert torch.allclose(w_ref.gather(1, o_ref.indices), w.gather(1, o.indices), atol=1e-6)


def test_bias_picks_but_never_weights():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 5.0])  # makes the weakest expert win the choice
    w, i, scores = route(logits, bias, 1, 1, 1, norm=False)
    assert i.item() == 3
    assert w.item() == pytest.approx(torch.sigmoid(torch.tensor(-1.0)).item())  # its own score, no bias
    w2, _, _ = route(logits, torch.zeros(4), 1, 1, 1, norm=False)
    assert w2.item() == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item())


def test_group_scored_by_sum_of_top2_not_max():
    # group 0 has the single best expert but a weak runner-up; group 1 has two good experts
    s = torch.tensor([[0.95, 0.05, 0.05, 0.05, 0.80, 0.75, 0.05, 0.05]])
    logits = torch.logit(s)
    _, i, _ = route(logits, torch.zeros(8), 2, 2, 1)
    assert sorted(i[0].tolist()) == [4, 5]  # max-per-group would have kept group 0 and chosen expert 0


def test_dropped_groups_are_minus_inf_not_zero():
    # negative biases make every biased score in the kept group negative; a 0 fill would let
    # experts of the dropped group (biased score 0 after filling) win the final top-k
    s = torch.full((1, 8), 0.5)
    logits = torch.logit(s)
    bias = torch.tensor([-0.6, -0.7, -0.8, -0.9, -2.0, -2.0, -2.0, -2.0])
    _, i, _ = route(logits, bias, 2, 2, 1)
    assert sorted(i[0].tolist()) == [0, 1]
    zero_fill = (s + bias).clone()
    zero_fill[:, 4:] = 0.0
    assert set(zero_fill.topk(2).indices[0].tolist()) <= {4, 5, 6, 7}  # the wrong answer the test rules out


def test_norm_topk_prob_and_scaling_are_independent():
    logits = torch.randn(50, 16)
    bias = 0.1 * torch.randn(16)
    w_plain, i, scores = route(logits, bias, 4, 4, 2, norm=False, scale=1.0)
    w_scaled, i2, _ = route(logits, bias, 4, 4, 2, norm=False, scale=2.5)
    w_norm, _, _ = route(logits, bias, 4, 4, 2, norm=True, scale=1.0)
    w_both, _, _ = route(logits, bias, 4, 4, 2, norm=True, scale=2.5)
    assert torch.equal(i, i2)
    assert torch.allclose(w_plain, scores.gather(1, i))
    assert torch.allclose(w_scaled, 2.5 * w_plain)
    assert torch.allclose(w_norm.sum(-1), torch.ones(50))
    assert torch.allclose(w_both.sum(-1), torch.full((50,), 2.5))


def test_correction_bias_update_direction():
    cfg = load_config("deepseek_v3_tiny").model
    moe = MoE(cfg, 1)
    load = torch.tensor([10, 0, 5, 5, 5, 5, 5, 5])  # mean 5: expert 0 over, 1 under, rest exact
    moe.update_correction_bias(load, 0.01)
    b = moe.e_score_correction_bias
    assert b[0].item() == pytest.approx(-0.01) and b[1].item() == pytest.approx(0.01)
    assert torch.all(b[2:] == 0)
    assert not b.requires_grad


def test_bias_update_rebalances_routing():
    cfg = load_config("deepseek_v3_tiny").model
    moe = MoE(cfg, 1)
    with torch.no_grad():
        moe.router.weight.normal_(0, 0.02)
        moe.e_score_correction_bias[0] = 0.5  # expert 0 starts out hogging the tokens
    x = torch.randn(1, 256, cfg.d_model)

    def load():
        with torch.no_grad():
            _, aux = moe(x)
        return aux["moe_load"].float()
    t = before = load()
    late = []
    for i in range(30):
        moe.update_correction_bias(t, 0.02)
        t = load()
        if i >= 20:
            late.append(t)
    after = torch.stack(late).mean(0)  # sign steps oscillate around balance: average the tail
    assert before[0] > 2 * before.mean()
    assert after[0] < 0.5 * before[0] and after.std() < 0.5 * before.std()


def test_first_k_dense_and_shared_experts():
    cfg = load_config("deepseek_v3_tiny", ["model.first_k_dense=2", "model.n_layers=4"]).model
    assert [f for _, f in cfg.layer_types] == ["dense", "dense", "moe", "moe"]
    moe = MoE(cfg, 2)
    assert moe.shared is not None and moe.shared.d_ff == cfg.d_ff_expert * cfg.n_shared_experts
    x = torch.randn(2, 5, cfg.d_model)
    routed_only = moe(x)[0] - moe.shared(x)
    w, i, _ = moe.route(x.reshape(-1, cfg.d_model))
    ref = torch.zeros(10, cfg.d_model)
    for n in range(10):
        for j in range(cfg.n_experts_per_tok):
            e = i[n, j]
            g, u = (moe.w_gate_up[e] @ x.reshape(-1, cfg.d_model)[n]).chunk(2)
            ref[n] += w[n, j] * (moe.w_down[e] @ (torch.nn.functional.silu(g) * u))
    assert torch.allclose(routed_only.reshape(-1, cfg.d_model), ref, atol=1e-5)


def test_sequence_aux_loss_balanced_value_and_imbalance():
    # uniform scores with a perfectly balanced assignment give exactly 1 (f_i = 1, P_i = 1/E)
    B, T, E, k = 2, 8, 4, 2
    scores = torch.full((B * T, E), 0.3)
    idx = torch.tensor([[0, 1], [2, 3]] * (B * T // 2))
    assert sequence_aux_loss(scores, idx, E, B).item() == pytest.approx(1.0)
    # all tokens on experts 0,1 which also carry the score mass -> larger
    s2 = torch.tensor([[0.9, 0.9, 0.1, 0.1]]).repeat(B * T, 1)
    idx2 = torch.tensor([[0, 1]]).repeat(B * T, 1)
    assert sequence_aux_loss(s2, idx2, E, B).item() > 1.5
