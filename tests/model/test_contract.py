"""The model's one forward contract and what it promises every consumer:
- every parameter has exactly one role, and initialisation, optimizer groups and counts read it;
- losses, expert loads and logits come out of `forward` (ModelOutput), for the MTP blocks too;
- a request on a cache starts clean: two requests on one Qwen3-Next cache give what two fresh
  caches give (a recurrent state never leaks from one request into the next);
- parallel wrapping keeps the forward and the state-dict names of the plain model."""
import math

import pytest
import torch

from deepwish.config import load_config, model_config
from deepwish.generate import generate, prefill
from deepwish.model import Objective, Transformer
from deepwish.model.roles import ROLES

PRESETS = ("qwen3_tiny", "qwen3_moe_tiny", "qwen3_next_tiny", "deepseek_v3_tiny", "deepseek_v32_tiny", "gpt_tiny",
           "gpt_moe_tiny", "gpt2_baseline_tiny")


@pytest.mark.parametrize("preset", PRESETS)
def test_every_parameter_has_exactly_one_role(preset):
    model = Transformer(model_config(preset))
    roles = model.param_roles()
    assert list(roles) == [n for n, _ in model.named_parameters()]
    assert set(roles.values()) <= set(ROLES)
    assert all(role for role in roles.values())
    # counts read the roles: active parameters are the total minus the inactive routed experts
    experts = sum(model.get_parameter(n).numel() for n, r in roles.items() if r in ("expert", "expert_out"))
    cfg = model.cfg
    inactive = experts - experts * cfg.n_experts_per_tok // max(cfg.n_experts, 1) if experts else 0
    assert model.num_params(active=True) == model.num_params() - inactive


def test_routed_expert_outputs_get_the_residual_initialisation():
    cfg = model_config("deepseek_v3_tiny", init_std=0.02)
    torch.manual_seed(0)
    model = Transformer(cfg)
    out_std = 0.02 / math.sqrt(2 * cfg.n_layers)
    moe = model.blocks[cfg.first_k_dense].ffn
    assert model.param_roles()[f"blocks.{cfg.first_k_dense}.ffn.w_down"] == "expert_out"
    assert float(moe.w_down.detach().std()) == pytest.approx(out_std, rel=0.05)  # like every residual output
    assert float(moe.w_gate_up.detach().std()) == pytest.approx(0.02, rel=0.05)
    assert float(model.blocks[0].mixer.o_proj.weight.detach().std()) == pytest.approx(out_std, rel=0.1)


def test_forward_returns_loss_logits_and_mtp_moe_loads():
    rc = load_config("deepseek_v3_tiny", ["model.n_layers=2", "model.first_k_dense=1", "model.n_mtp=1"])
    model = Transformer(rc.model).train()
    x = torch.randint(0, rc.model.vocab_size, (2, 12))
    out = model(x, targets=x)  # HF / nanoGPT style: the mean cross-entropy
    ce = torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]).float(), x.reshape(-1))
    assert torch.allclose(out.loss, ce + sum(out.aux_losses.values(), torch.zeros(())), rtol=1e-5)
    assert "mtp" not in out.aux_losses  # MTP runs only when the objective weighs it
    with_mtp = model(x, targets=x, objective=Objective(mtp_weight=0.3))
    # the MTP block (layer n_layers + 0 = 2) is an MoE layer: its loads come out with the trunk's
    assert sorted(with_mtp.moe_loads) == [1, 2] and "mtp" in with_mtp.aux_losses
    assert int(with_mtp.moe_loads[2].sum()) == 2 * 12 * rc.model.n_experts_per_tok


def test_mtp_moe_layers_are_balanced_by_the_trainer(tmp_path):
    """The correction bias of the MoE inside an MTP module moves during training, as the trunk's do
    (before the forward contract, the MTP blocks' loads never reached the bias update)."""
    from deepwish.train import loop
    rc = load_config("deepseek_v3_tiny", [
        f"train.out_dir={tmp_path}", "train.steps=3", "train.seq_len=32", "train.batch_size=2",
        "train.eval_every=3", "train.save_every=3", "train.eval_batches=1", "train.sample_tokens=0",
        "train.device=cpu", "model.n_layers=2", "model.bias_update_rate=0.01"])
    assert rc.model.n_mtp >= 1 and rc.model.router == "sigmoid"
    summary = loop.train(rc, progress_bar=False)
    from deepwish.weights import load_weights
    state, _ = load_weights(summary["checkpoint"])
    mtp_bias = [v for k, v in state.items() if k.startswith("mtp.") and k.endswith("e_score_correction_bias")]
    trunk_bias = [v for k, v in state.items() if k.startswith("blocks.") and k.endswith("e_score_correction_bias")]
    assert mtp_bias and trunk_bias
    assert all(b.abs().sum() > 0 for b in trunk_bias + mtp_bias)


def _next_model():
    torch.manual_seed(0)
    return Transformer(model_config("qwen3_next_tiny", n_layers=4, vocab_size=97)).eval()


def test_two_requests_on_one_recurrent_cache_equal_two_fresh_caches():
    model = _next_model()
    a, b = torch.randint(0, 97, (9,)).tolist(), torch.randint(0, 97, (6,)).tolist()
    fresh = [generate(model, [p], 8, cache=model.make_cache(1, 32))[0] for p in (a, b)]
    cache = model.make_cache(1, 32)
    shared = [generate(model, [p], 8, cache=cache)[0] for p in (a, b)]
    assert shared == fresh
    # prefill from position 0 starts a request too; from a later position it continues one
    with torch.no_grad():
        one = prefill(model, torch.tensor([a]), model.make_cache(1, 32))
        prefill(model, torch.tensor([b]), cache)
        again = prefill(model, torch.tensor([a]), cache)
    assert torch.equal(one, again)


@pytest.mark.gpu
def test_two_requests_on_one_captured_cache_equal_two_fresh_caches(cuda):
    from deepwish.decode_graph import CapturedDecoder
    model = _next_model().to(cuda)
    prompts = [torch.randint(0, 97, (9,)).tolist(), torch.randint(0, 97, (6,)).tolist()]
    fresh = [generate(model, [p], 12, cache=model.make_cache(1, 32))[0] for p in prompts]
    cache = model.make_cache(1, 32)
    step = CapturedDecoder(model, cache)
    assert [generate(model, [p], 12, cache=cache, decode_fn=step)[0] for p in prompts] == fresh


def test_parallel_wrapping_keeps_forward_and_state_names():
    """Compile, activation checkpointing and offload wrap blocks from outside with torch's own
    wrappers: the model's forward is the class's (never replaced on an instance), state-dict keys
    stay the plain model's, and the wrapped model computes the same loss."""
    from deepwish.train.parallel import Dist, parallelize
    rc = load_config("qwen3_tiny", ["model.n_layers=2", "train.activation_checkpoint=full",
                                    "train.offload=activations", "train.compile=off"])
    torch.manual_seed(0)
    plain = Transformer(rc.model)
    wrapped = Transformer(rc.model)
    wrapped.load_state_dict(plain.state_dict())
    step_model = parallelize(wrapped, rc, Dist(0, 1, 0, torch.device("cpu"), None))
    assert step_model is wrapped
    assert all("forward" not in vars(m) for m in wrapped.modules())
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    x = torch.randint(0, rc.model.vocab_size, (2, 10))
    assert torch.allclose(wrapped(x, targets=x).loss, plain(x, targets=x).loss)
    assert set(wrapped.param_roles().values()) == set(plain.param_roles().values())
