"""GRPO/DAPO loss terms against a direct, per-token computation on a toy batch."""
import math

import pytest
import torch

from deepwish.rl.loss import (GRPOLoss, group_advantages, grpo_loss, informative_groups, k3, mismatch_share,
                              token_mask)


def test_group_advantages_direct():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.5, 1.0, 0.0]])
    adv = group_advantages(r, scale_by_std=True, eps=1e-6)
    for p in range(3):
        xs = r[p].tolist()
        mean = sum(xs) / 4
        std = math.sqrt(sum((x - mean) ** 2 for x in xs) / 3)
        for g in range(4):
            assert adv[p, g].item() == pytest.approx((xs[g] - mean) / (std + 1e-6), rel=1e-5, abs=1e-6)
    assert torch.equal(group_advantages(r, scale_by_std=False), r - r.mean(1, keepdim=True))
    assert informative_groups(r).tolist() == [True, False, True]


def test_k3_is_nonnegative_and_unbiased():
    torch.manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.5, 0.3])
    kl = float((p * (p / q).log()).sum())
    x = torch.multinomial(p, 200000, replacement=True)
    est = k3(p.log()[x], q.log()[x])
    assert (est >= 0).all()
    assert float(est.mean()) == pytest.approx(kl, rel=0.03)


def _direct(logp, old, ref, adv, mask, cfg):
    """The objective written token by token in plain Python."""
    total, n_tok, rows = 0.0, 0, []
    for i in range(len(logp)):
        row, n = 0.0, 0
        for t in range(len(logp[0])):
            if not mask[i][t]:
                continue
            rho = math.exp(logp[i][t] - old[i][t])
            a = adv[i]
            pg = -min(rho * a, min(max(rho, 1 - cfg.clip_low), 1 + cfg.clip_high) * a)
            d = ref[i][t] - logp[i][t]
            term = pg + cfg.kl_beta * (math.exp(d) - d - 1)
            row += term
            n += 1
        total += row
        n_tok += n
        if n:
            rows.append(row / n)
    return total / n_tok if cfg.token_level else sum(rows) / len(rows)


@pytest.mark.parametrize("token_level", [True, False])
@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_loss_matches_direct_computation_and_gradient(token_level, beta):
    torch.manual_seed(1)
    P, G, T = 2, 3, 5
    cfg = GRPOLoss(clip_low=0.2, clip_high=0.28, token_level=token_level, kl_beta=beta)
    rewards = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    adv = group_advantages(rewards).reshape(-1)
    keep = informative_groups(rewards).repeat_interleave(G)
    lens = torch.tensor([5, 3, 4, 2, 5, 1])
    completion = torch.arange(T)[None] < lens[:, None]
    truncated = torch.tensor([True, False, False, False, False, False])
    mask = token_mask(completion, truncated, keep, cfg)
    assert mask[0].sum() == 0 and mask[3:].sum() == 0 and mask[1].sum() == 3
    old = -torch.rand(P * G, T) * 2
    logp = (old + torch.randn(P * G, T) * 0.4).requires_grad_()  # ratios well outside the clip range
    ref = old + torch.randn(P * G, T) * 0.1
    norm = float(mask.sum()) if token_level else float((mask.sum(1) > 0).sum())
    # two micro-batches with the global normaliser sum to the whole batch's loss
    a = grpo_loss(logp[:3], old[:3], adv[:3], mask[:3], cfg, norm=norm, ref_logp=ref[:3])
    b = grpo_loss(logp[3:], old[3:], adv[3:], mask[3:], cfg, norm=norm, ref_logp=ref[3:])
    direct = _direct(logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), cfg)
    assert float((a.loss + b.loss).detach()) == pytest.approx(direct, rel=1e-5)
    # gradient: the direct objective's d/dlogp is ρ·A where the unclipped term is active, else 0
    (a.loss + b.loss).backward()
    rho = torch.exp(logp.detach() - old)
    A = adv[:, None].expand_as(rho)
    unclipped_active = rho * A <= rho.clamp(1 - cfg.clip_low, 1 + cfg.clip_high) * A
    d = ref - logp.detach()
    g = torch.where(unclipped_active, -rho * A, torch.zeros_like(rho)) + beta * (1 - torch.exp(d))
    if token_level:
        g = g * mask / norm
    else:
        g = g * mask / mask.sum(1, keepdim=True).clamp_min(1) / norm
    torch.testing.assert_close(logp.grad, g, rtol=1e-5, atol=1e-7)
    clipped = int(((~unclipped_active) & mask).sum())
    assert int(a.clipped + b.clipped) == clipped > 0
    assert int(a.tokens + b.tokens) == int(mask.sum())


def test_ratio_one_gives_plain_policy_gradient():
    """At ρ = 1 (first update on fresh samples) the gradient is -A per token / token count."""
    logp = torch.full((2, 3), -1.0, requires_grad=True)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 3, dtype=torch.bool)
    out = grpo_loss(logp, logp.detach(), adv, mask, GRPOLoss(), norm=6.0)
    out.loss.backward()
    torch.testing.assert_close(logp.grad, -adv[:, None].expand(2, 3) / 6)
    assert int(out.clipped) == 0


def test_truncation_mask_switch_and_config_errors():
    cfg = GRPOLoss(mask_truncated=False)
    m = token_mask(torch.ones(2, 2, dtype=torch.bool), torch.tensor([True, False]), torch.tensor([True, True]), cfg)
    assert m.all()
    with pytest.raises(ValueError, match="clip_low"):
        GRPOLoss(clip_low=1.5)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1), torch.ones(1, 1, dtype=torch.bool),
                  GRPOLoss(kl_beta=0.1), norm=1.0)


def test_mismatch_share():
    a = torch.log(torch.tensor([[1.0, 1.0, 1.0, 1.0]]))
    b = torch.log(torch.tensor([[1.0, 1.05, 1.2, 0.5]]))
    mask = torch.tensor([[True, True, True, False]])
    assert mismatch_share(a, b, mask) == pytest.approx(1 / 3)
