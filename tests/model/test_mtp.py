"""Multi-token prediction: targets per depth, causality of every depth, the released module
structure, the loss hook in train/loss.py (λ, ramp, gradient reach), and the HF checkpoint note."""
import pytest
import torch

from deepwish.config import load_config
from deepwish.model.mtp import IGNORE_INDEX, mtp_ce_sums, mtp_hidden_states, mtp_lambda_at, mtp_targets
from deepwish.model.transformer import Transformer
from deepwish.train.loss import lm_loss


def tiny(n_mtp=2, *extra):
    rc = load_config("deepseek_v3_tiny", ["model.n_layers=2", f"model.n_mtp={n_mtp}", "model.d_model=64",
                                          "model.vocab_size=101", *extra])
    return rc


def test_targets_shift_and_document_boundaries():
    t = torch.arange(10, 20)[None]  # targets[i] = token i+1
    doc = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1, 1]])
    out = mtp_targets(t, 2, doc)
    I = IGNORE_INDEX
    # i=0,1: targets[2], targets[3] (same doc); i=2,3: targets[4], [5] cross into doc 1 -> ignored
    assert out.tolist() == [[12, 13, I, I, 16, 17, 18, 19, I, I]]
    assert mtp_targets(t, 12).eq(I).all()


def test_module_structure_matches_released_checkpoints():
    model = Transformer(tiny().model)
    names = {n.split(".", 2)[2] for n, _ in model.named_parameters() if n.startswith("mtp.0.")}
    assert {"enorm.weight", "hnorm.weight", "eh_proj.weight", "norm.weight"} <= names
    assert any(n.startswith("block.mixer.kv_b_proj") for n in names)
    assert any(n.startswith("block.ffn.w_gate_up") for n in names)  # layer n_layers is an MoE layer
    assert model.mtp[0].eh_proj.weight.shape == (64, 128)
    assert [m.depth for m in model.mtp] == [1, 2]


def test_depths_are_causal():
    """Depth k at position i may see tokens up to i+k (it predicts i+k+1), never beyond."""
    model = Transformer(tiny().model).eval()
    x = torch.randint(0, 101, (1, 16))
    y = x.clone()
    j = 11
    y[0, j] = (y[0, j] + 1) % 101
    with torch.no_grad():
        hx = mtp_hidden_states(model, model(x, return_hidden=True).hidden, x)
        hy = mtp_hidden_states(model, model(y, return_hidden=True).hidden, y)
    for k, (a, b) in enumerate(zip(hx, hy), start=1):
        same = (a - b).abs().amax(-1)[0] < 1e-6
        assert same[: j - k].all(), k  # positions that cannot see token j
        assert not same[j - k], k  # position i = j-k reads Emb(t_j) directly


def test_loss_hook_adds_weighted_mtp_loss_and_trains_mtp():
    rc = tiny(2, "train.mtp_lambda=0.5")
    model = Transformer(rc.model)
    x = torch.randint(0, 101, (2, 24))
    t = torch.randint(0, 101, (2, 24))
    n = int(t.numel())
    loss, m = lm_loss(model, (x, t, None, None), rc.train, n, backend="torch")
    assert "aux/mtp" in m
    with torch.no_grad():
        h = model(x, return_hidden=True).hidden
        sums, counts = mtp_ce_sums(mtp_hidden_states(model, h, x), model.logits, t)
    assert counts.tolist() == [2 * 23, 2 * 22]
    assert m["aux/mtp"].item() == pytest.approx(0.5 * sums.mean().item() / n, rel=1e-5)
    loss.backward()
    assert model.mtp[1].eh_proj.weight.grad.abs().sum() > 0
    assert model.blocks[0].mixer.kv_b_proj.weight.grad.abs().sum() > 0
    off, m0 = lm_loss(model, (x, t, None, None), load_config("deepseek_v3_tiny", ["train.mtp_lambda=0"]).train,
                      n, backend="torch")
    assert "aux/mtp" not in m0


def test_lambda_ramp():
    assert mtp_lambda_at(0.3, -1.0, 50, 100) == 0.3
    assert mtp_lambda_at(0.3, 0.1, 0, 101) == pytest.approx(0.3)
    assert mtp_lambda_at(0.3, 0.1, 50, 101) == pytest.approx(0.2)
    assert mtp_lambda_at(0.3, 0.1, 100, 101) == pytest.approx(0.1)


def test_missing_mtp_tensors_load_with_note(tmp_path, capsys):
    from deepwish import load_hf, save_hf
    model = Transformer(tiny(0).model).eval()
    path = save_hf(model, tmp_path / "ck")
    import json
    d = json.loads((path / "config.json").read_text())
    d["num_nextn_predict_layers"] = 1  # announced, not present
    (path / "config.json").write_text(json.dumps(d))
    back = load_hf(path)
    assert back.cfg.n_mtp == 0 and back.mtp is None
    assert "n_mtp=0" in capsys.readouterr().out
