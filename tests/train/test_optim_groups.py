"""Optimizer groups by parameter role (train/optim.py param_groups): hidden matrices (Muon),
embeddings, head and scalars/gates, each with its own lr and weight decay."""
from dataclasses import replace

import pytest
import torch

from deepwish.config import ModelConfig, TrainConfig
from deepwish.model import Transformer
from deepwish.train.optim import build_optimizer, group_settings, param_groups

CFG = ModelConfig(family="gpt", vocab_size=61, d_model=16, n_layers=2, n_heads=2, n_kv_heads=2, head_dim=8, d_ff=24,
                  max_seq_len=64, fused_qkv=True, residual_scales=True, unet_skips=True, value_embeds=1,
                  gated_ffn=False, hidden_act="relu2", position="learned")


def _names(model, groups):
    ids = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: sorted(ids[id(p)] for p in g["params"]) for opt in groups.values() for g in opt}


def test_groups_follow_roles():
    model = Transformer(CFG)
    pg = param_groups(model, TrainConfig())
    assert [g["name"] for g in pg["muon"]] == ["matrix"]
    assert [g["name"] for g in pg["adamw"]] == ["embedding", "head", "scalar"]
    names = _names(model, pg)
    assert names["embedding"] == ["embed.weight", "pos_embed.weight", "value_embeds.tables.0.weight"]
    assert names["head"] == ["lm_head.weight"]
    assert "blocks.0.mixer.qkv_weight" in names["matrix"] and "blocks.1.ffn.w_up.weight" in names["matrix"]
    assert {"skips.gates", "blocks.0.residual_scales", "blocks.0.mixer.ve_gate.weight", "norm.weight"} <= set(
        names["scalar"])
    assert sum(len(v) for v in names.values()) == len(list(model.parameters()))
    # optimizer=adamw: the matrices become an AdamW group at train.lr
    pg = param_groups(model, TrainConfig(optimizer="adamw", lr=1e-3))
    assert pg["muon"] == [] and [(g["name"], g["lr"]) for g in pg["adamw"]][0] == ("matrix", 1e-3)


def test_a_tied_token_table_is_in_the_head_group():
    """Tied, the token table is also the head, whose side bounds a stable step: train.head_lr, not
    embed_lr (gpt_124m's embed_lr 0.3 on its tied table diverged on the H200: val 8.56 after 100 steps)."""
    model = Transformer(replace(CFG, tie_embeddings=True))
    pg = param_groups(model, TrainConfig(embed_lr=0.3, head_lr=0.008))
    names = _names(model, pg)
    assert names["head"] == ["embed.weight"]
    assert names["embedding"] == ["pos_embed.weight", "value_embeds.tables.0.weight"]
    assert {g["name"]: g["lr"] for g in pg["adamw"]}["head"] == 0.008
    assert sum(len(v) for v in names.values()) == len(list(model.parameters()))


def test_neutral_settings_are_the_old_two_adamw_families():
    tc = TrainConfig(lr=1e-3, muon_lr=0.05, weight_decay=0.1)
    assert group_settings(tc) == {"matrix": (0.05, 0.1), "embedding": (1e-3, 0.1), "head": (1e-3, 0.1),
                                  "scalar": (1e-3, 0.0)}
    tc = replace(tc, embed_lr=0.3, head_lr=0.004, scalar_lr=0.02, embed_wd=0.0, head_wd=0.5, scalar_wd=0.01,
                 muon_wd=0.2)
    assert group_settings(tc) == {"matrix": (0.05, 0.2), "embedding": (0.3, 0.0), "head": (0.004, 0.5),
                                  "scalar": (0.02, 0.01)}


def _step(model, tc, zero_grads=False):
    opt = build_optimizer(model, tc)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    if zero_grads:
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
    else:
        ids = torch.randint(0, 61, (2, 12))
        model(ids, targets=ids).loss.backward()
    opt.step()
    return before, opt


def test_each_group_steps_with_its_own_lr_and_decay():
    torch.manual_seed(0)
    model = Transformer(CFG)
    tc = TrainConfig(lr=1e-2, embed_lr=1e-3, head_lr=2e-3, scalar_lr=3e-3)
    before, _ = _step(model, tc)
    # AdamW's first step moves every element with a gradient by lr (|g| / (|g| + eps) ~ 1)
    for name, lr in (("embed.weight", 1e-3), ("lm_head.weight", 2e-3), ("skips.gates", 3e-3),
                     ("blocks.1.residual_scales", 3e-3)):
        delta = (dict(model.named_parameters())[name] - before[name]).abs().max().item()
        assert abs(delta - lr) < 0.05 * lr, (name, delta, lr)
    # decoupled decay with zero gradients: p <- p·(1 - lr·wd), per group
    torch.manual_seed(0)
    model = Transformer(CFG)
    tc = TrainConfig(lr=0.1, embed_wd=0.5, head_wd=0.25, scalar_wd=0.0, muon_wd=0.3, muon_lr=0.2)
    before, _ = _step(model, tc, zero_grads=True)
    params = dict(model.named_parameters())
    for name, factor in (("embed.weight", 1 - 0.1 * 0.5), ("lm_head.weight", 1 - 0.1 * 0.25),
                         ("norm.weight", 1.0), ("blocks.0.mixer.o_proj.weight", 1 - 0.2 * 0.3)):
        torch.testing.assert_close(params[name], before[name] * factor, rtol=1e-5, atol=1e-6)


def test_a_state_from_other_groups_is_one_clear_error():
    """A checkpoint whose AdamW groups were drawn otherwise (the tied table with the position table,
    as before the tied head joined the head's group) names the groups and the way on (--init-from)."""
    tied = replace(CFG, tie_embeddings=True, value_embeds=0)
    model = Transformer(tied)
    opt = build_optimizer(model, TrainConfig())
    state = opt.state_dict()
    groups = state["adamw"]["param_groups"]  # [embedding (pos), head (tied token table), scalar]
    merged = dict(groups[0], params=groups[0]["params"] + groups[1]["params"])
    state["adamw"]["param_groups"] = [merged] + groups[2:]
    with pytest.raises(ValueError, match=r"adamw state does not fit this run's parameter groups .*--init-from"):
        build_optimizer(model, TrainConfig()).load_state_dict(state)
