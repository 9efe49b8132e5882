"""Activation dtypes under autocast. train.residual_dtype (Objective.residual_dtype): the residual
stream is carried in bf16 from x0 on (every block's input and output), the loss and gradients stay
those of the fp32 stream to bf16 rounding, and without autocast nothing changes. RMSNorm returns its
input's dtype."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from deepwish.config import ConfigError, load_config, validate
from deepwish.model import Transformer
from deepwish.model.objective import Objective
from deepwish.train.loss import eval_objective, step_objective

GPT_ALL_ON = ["model.fused_qkv=true", "model.residual_scales=true", "model.unet_skips=true",
              "model.value_embeds=1", "model.embed_norm=true", "model.attn_backend=sdpa"]


def _model(preset: str, overrides=()) -> Transformer:
    torch.manual_seed(0)
    cfg = load_config(preset, list(overrides)).model
    return Transformer(replace(cfg, n_layers=4) if cfg.family == "gpt" else cfg).train()


def _run(model, ids, residual_dtype, autocast=True):
    """(loss, {name: grad}, dtypes of every block's input and output) of one forward/backward."""
    seen = []
    hooks = [b.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out[0].dtype)))
             for b in model.blocks]
    model.zero_grad(set_to_none=True)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        loss = model(ids, targets=ids, objective=Objective(residual_dtype=residual_dtype)).loss
    loss.backward()
    for h in hooks:
        h.remove()
    return loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}, seen


# MoE: near-tied router scores pick other experts under the stream's rounding, so its expert and
# router gradients move by more than rounding (cosines 0.97-0.99 measured): its check is the whole
# gradient's.
@pytest.mark.parametrize("preset,overrides,per_tensor", [("gpt_tiny", GPT_ALL_ON, True),
                                                         ("qwen3_moe_tiny", ["model.attn_backend=sdpa"], False)])
def test_bf16_stream_under_autocast_keeps_the_fp32_streams_loss_and_gradients(preset, overrides, per_tensor):
    model = _model(preset, overrides)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 48))
    loss32, g32, seen32 = _run(model, ids, None)
    loss16, g16, seen16 = _run(model, ids, torch.bfloat16)
    # autocast alone keeps the fp32 stream (fp32 embedding rows); the option carries it in bf16 throughout,
    # the MoE layers' fp32 combine included
    assert seen32 and all(s == (torch.float32, torch.float32) for s in seen32)
    assert seen16 and all(s == (torch.bfloat16, torch.bfloat16) for s in seen16)
    assert abs(loss16 - loss32) <= 2e-2 * loss32
    assert g16.keys() == g32.keys()
    cos = torch.nn.functional.cosine_similarity
    flat = [torch.cat([g[n].flatten() for n in g32]) for g in (g16, g32)]
    assert cos(*flat, dim=0) > 0.999
    for name, g in g32.items() if per_tensor else ():
        # the learned scalars' gradients (residual scales, skip gates) are sums over every token that
        # mostly cancel: the stream's rounding moves them most (measured cosines 0.97-0.99 here)
        bound = 0.99 if g.numel() > 16 else 0.9
        assert cos(g16[name].flatten(), g.flatten(), dim=0) > bound, name


def test_without_autocast_the_option_changes_nothing():
    model = _model("gpt_tiny", GPT_ALL_ON)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 32))
    loss_a, g_a, seen_a = _run(model, ids, None, autocast=False)
    loss_b, g_b, seen_b = _run(model, ids, torch.bfloat16, autocast=False)
    assert torch.equal(loss_a, loss_b) and seen_a == seen_b
    assert all(torch.equal(g_a[n], g_b[n]) for n in g_a)


def test_the_training_and_evaluation_objectives_carry_it_and_bad_settings_are_refused():
    tc = load_config("gpt_tiny", ["train.residual_dtype=bf16"]).train
    assert step_objective(tc, 0, "torch", 10).residual_dtype is torch.bfloat16
    assert eval_objective(tc, "torch").residual_dtype is torch.bfloat16
    assert step_objective(load_config("gpt_tiny").train, 0, "torch", 10).residual_dtype is None
    with pytest.raises(ConfigError, match="residual_dtype='fp16': is not one of fp32, bf16"):
        validate(load_config("gpt_tiny", ["train.residual_dtype=fp16"]))
    with pytest.raises(ConfigError, match="residual_dtype.*bf16 needs train.dtype=bf16"):
        validate(load_config("gpt_tiny", ["train.residual_dtype=bf16", "train.dtype=fp32"]))


def test_rms_norm_returns_its_inputs_dtype_and_a_matmul_after_it_sees_the_same_values():
    """Under autocast (fp32 weight, bf16 activation) the norm returns bf16: rotary after QK-norm and
    its gradient stay in bf16; a matmul consumer gets exactly the values and gradients of the
    promoted fp32 form, which autocast rounded the same way."""
    from deepwish.model.norm import rms_norm

    def promoted(x, w, eps):
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)

    torch.manual_seed(0)
    x0, w0, lin0 = torch.randn(64, 96, dtype=torch.bfloat16), torch.randn(96), torch.randn(48, 96)
    runs = []
    for norm in (promoted, rms_norm):
        x, w, lin = (t.clone().requires_grad_() for t in (x0, w0, lin0))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = norm(x, w, 1e-6)
            y = h @ lin.t()
        y.float().square().sum().backward()
        runs.append((h.dtype, y, x.grad, w.grad, lin.grad))
    assert (runs[0][0], runs[1][0]) == (torch.float32, torch.bfloat16)
    for a, b in zip(runs[0][1:], runs[1][1:]):
        assert a.dtype == b.dtype and torch.equal(a, b)
    x32 = x0.float()  # fp32 in, fp32 out: the formula as before
    torch.testing.assert_close(rms_norm(x32, w0, 1e-6), promoted(x32, w0, 1e-6), rtol=0, atol=0)
