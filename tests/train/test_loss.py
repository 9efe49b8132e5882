"""lm_loss: global-token normalisation (gradient accumulation == one big batch), z-loss,
auxiliary losses, backend resolution."""
import pytest
import torch
import torch.nn.functional as F

from deepwish.config import TrainConfig, model_config
from deepwish.model import Transformer
from deepwish.train.loss import count_targets, lm_loss, resolve_loss_backend

TINY = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64, max_seq_len=64)


def make_batch(B, T, V, ignore_frac=0.3):
    ids = torch.randint(0, V, (B, T))
    targets = torch.randint(0, V, (B, T))
    targets[torch.rand(B, T) < ignore_frac] = -100
    doc_ids = torch.zeros(B, T, dtype=torch.int32)
    doc_ids[:, T // 2:] = 1
    positions = torch.arange(T).expand(B, T) - doc_ids.long() * (T // 2)
    return ids, targets, doc_ids, positions


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_loss_is_mean_ce_over_targets():
    model = Transformer(model_config("qwen3_tiny", **TINY))
    batch = make_batch(3, 16, 64)
    loss, m = lm_loss(model, batch, TrainConfig(), count_targets(batch[1]), backend="torch")
    logits = model(batch[0], positions=batch[3], doc_ids=batch[2]).logits
    ref = F.cross_entropy(logits.reshape(-1, 64), batch[1].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, ref)
    assert int(m["n_targets"]) == count_targets(batch[1])


def test_grad_accumulation_equals_one_big_batch():
    model = Transformer(model_config("qwen3_tiny", **TINY))
    cfg = TrainConfig()
    batch = make_batch(4, 16, 64)
    # Micro-batches with very different numbers of targets: a per-micro-batch mean would differ.
    batch[1][:2, :12] = -100
    n_global = count_targets(batch[1])
    loss, _ = lm_loss(model, batch, cfg, n_global, backend="torch")
    loss.backward()
    big = grads(model)
    model.zero_grad()
    total = 0.0
    for sl in (slice(0, 1), slice(1, 3), slice(3, 4)):
        micro = tuple(t[sl] for t in batch)
        l, _ = lm_loss(model, micro, cfg, n_global, backend="torch")
        l.backward()
        total += float(l.detach())
    assert total == pytest.approx(float(loss.detach()), rel=1e-6)
    for n, g in grads(model).items():
        torch.testing.assert_close(g, big[n], rtol=1e-5, atol=1e-7, msg=n)


def test_z_loss_adds_squared_log_partition():
    model = Transformer(model_config("qwen3_tiny", **TINY))
    batch = make_batch(2, 8, 64, ignore_frac=0.0)
    n = count_targets(batch[1])
    base, _ = lm_loss(model, batch, TrainConfig(), n, backend="torch")
    withz, m = lm_loss(model, batch, TrainConfig(z_loss=1e-2), n, backend="torch")
    lse = torch.logsumexp(model(batch[0], positions=batch[3], doc_ids=batch[2]).logits.float(), -1)
    torch.testing.assert_close(withz - base, 1e-2 * lse.square().mean(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(m["z_sum"] / n, 1e-2 * lse.square().mean(), rtol=1e-4, atol=1e-6)


def test_moe_aux_losses_are_added_and_reported():
    cfg_m = model_config("qwen3_moe_tiny", **TINY, n_experts=4, n_experts_per_tok=2, d_ff_expert=16,
                         router_aux_loss_coef=0.5)
    model = Transformer(cfg_m)
    batch = make_batch(2, 16, 64)
    n_local = count_targets(batch[1])
    n_global = 2 * n_local  # as if another micro-batch held as many targets
    loss, m = lm_loss(model, batch, TrainConfig(), n_global, backend="torch")
    # the balance losses of every MoE layer, each weighted by the model config's coefficient
    from deepwish.model.moe import switch_aux_loss
    aux = 0.0
    x = model.embed(batch[0])
    ctx = model.context(batch[0], batch[3], batch[2])
    for block in model.blocks:
        h, _ = block.mixer(block.attn_norm(x), ctx)
        x = x + h
        w, idx, probs = block.ffn.route(block.ffn_norm(x).reshape(-1, x.shape[-1]))
        aux = aux + 0.5 * switch_aux_loss(probs, idx, 4)
        x = x + block.ffn(block.ffn_norm(x))[0]
    share = n_local / n_global
    torch.testing.assert_close(m["aux/moe"], (share * aux).detach())
    torch.testing.assert_close(loss.detach(), (m["ce_sum"] / n_global + share * aux).detach())
    assert sorted(m["moe/loads"]) == list(range(cfg_m.n_layers))
    assert sum(int(v.sum()) for v in m["moe/loads"].values()) == 2 * 16 * 2 * cfg_m.n_layers


def test_an_auxiliary_loss_without_a_weight_is_an_error():
    from deepwish.model import Objective
    with pytest.raises(KeyError, match="no weight"):
        Objective().aux_weight("new_loss")


def test_backend_resolution_is_explicit():
    assert resolve_loss_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_loss_backend("torch", torch.device("cpu")) == "torch"
    with pytest.raises(Exception, match="loss"):
        resolve_loss_backend("cuda-magic", torch.device("cpu"))
    model = Transformer(model_config("qwen3_tiny", **TINY))
    with pytest.raises(ValueError, match="resolve 'auto'"):
        lm_loss(model, make_batch(1, 4, 64), TrainConfig(), 4, backend="auto")


def test_fused_backend_matches_torch_backend(rel_err):
    # Runs the Triton kernel in the interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1).
    assert resolve_loss_backend("triton", torch.device("cpu")) == "triton"
    model = Transformer(model_config("qwen3_tiny", **TINY))
    batch = make_batch(2, 16, 64)
    n = count_targets(batch[1])
    out = {}
    for backend in ("torch", "triton"):
        model.zero_grad()
        loss, m = lm_loss(model, batch, TrainConfig(z_loss=1e-3), n, backend=backend)
        loss.backward()
        out[backend] = (loss.detach(), grads(model))
    assert rel_err(out["torch"][0], out["triton"][0]) < 1e-5
    for name, g in out["torch"][1].items():
        assert rel_err(g, out["triton"][1][name]) < 1e-4, name


@pytest.mark.parametrize("ignore_frac", [0.3, 0.0])
def test_host_checked_targets_give_the_same_fused_loss_without_reading_back(rel_err, monkeypatch, ignore_frac):
    """With the batch's targets checked and counted on the host (checked_target_count ->
    Objective.checked_targets), the fused loss skips its device-side target check and takes the kept
    rows by a count it is given (nonzero_static; all rows when none is ignored): the same loss and
    gradients as the path that reads them back."""
    from deepwish.kernels.linear_cross_entropy import triton as lce
    from deepwish.train.loss import checked_target_count
    checks, nonzeros = [], []
    real_check = lce.check_target_values
    monkeypatch.setattr(lce, "check_target_values", lambda *a: checks.append(1) or real_check(*a))
    real_nonzero = torch.Tensor.nonzero
    monkeypatch.setattr(torch.Tensor, "nonzero", lambda self, *a, **k: nonzeros.append(1) or real_nonzero(self, *a, **k))
    model = Transformer(model_config("qwen3_tiny", **TINY))
    torch.manual_seed(3)
    batch = make_batch(2, 16, 64, ignore_frac=ignore_frac)
    n = count_targets(batch[1])
    assert checked_target_count(batch[1], 64) == n
    out = {}
    for checked in (None, n):
        checks.clear()
        nonzeros.clear()
        model.zero_grad()
        loss, _ = lm_loss(model, batch, TrainConfig(), n, backend="triton", checked_targets=checked)
        loss.backward()
        out[checked] = (loss.detach(), grads(model))
        assert (len(checks), len(nonzeros)) == ((1, 1) if checked is None else (0, 0))
    assert rel_err(out[None][0], out[n][0]) < 1e-6
    for name, g in out[None][1].items():
        assert rel_err(g, out[n][1][name]) < 1e-6, name
    bad = batch[1].clone()
    bad[0, 3] = 64
    with pytest.raises(ValueError, match=r"targets outside the vocabulary \[0, 64\).*\[64\]"):
        checked_target_count(bad, 64)


def test_mtp_loss_follows_lambda_ramp_and_is_skipped_in_evaluation():
    from deepwish.model.mtp import mtp_ce_sums, mtp_hidden_states
    mc = model_config("deepseek_v3_tiny", vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2,
                      q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                      head_dim=16, d_ff=64, d_ff_expert=16, max_seq_len=64)
    model = Transformer(mc)
    batch = make_batch(2, 16, 64)
    n = count_targets(batch[1])
    cfg = TrainConfig(steps=11, mtp_lambda=0.1, mtp_lambda_final=0.6)
    for step, lam in ((0, 0.1), (5, 0.35), (10, 0.6)):
        loss, m = lm_loss(model, batch, cfg, n, backend="torch", step=step)
        h = model(batch[0], positions=batch[3], doc_ids=batch[2], return_hidden=True).hidden
        hidden = mtp_hidden_states(model, h, batch[0], batch[3], batch[2])
        sums, _ = mtp_ce_sums(hidden, model.logits, batch[1], batch[2])
        torch.testing.assert_close(m["aux/mtp"], (lam * sums.mean() / n).detach(), rtol=1e-5, atol=1e-7)
    from deepwish.train.loss import eval_objective
    with torch.no_grad():
        out = model(batch[0], positions=batch[3], doc_ids=batch[2], targets=batch[1],
                    objective=eval_objective(cfg, "torch"))
    assert "mtp" not in out.aux_losses
