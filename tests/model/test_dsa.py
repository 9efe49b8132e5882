"""DSA (DeepSeek-V3.2): indexer score against a per-head loop, top-k mask, dense fallback when
top-k covers everything, indexer training modes (which parameters each loss reaches), the KL,
decode with the indexer cache, and a short `deepwish train` run of the V3.2 tiny preset."""
from dataclasses import replace

import pytest
import torch

from deepwish.config import load_config
from deepwish.model import Objective
from deepwish.model.dsa import DSA, DSACache, indexer_kl
from deepwish.model.transformer import Transformer
from deepwish.train.loss import lm_loss


def tiny(*extra):
    return load_config("deepseek_v32_tiny", ["model.n_layers=2", "model.n_mtp=0", "model.d_model=64",
                                             "model.vocab_size=101", "model.index_topk=6", *extra])


def randomise(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p)) if p.dim() == 1 else p.normal_(0, 0.1)


def setup(T=20, *extra):
    rc = tiny(*extra)
    model = Transformer(rc.model).eval()
    randomise(model)
    dsa = model.blocks[0].mixer
    x = torch.randn(2, T, rc.model.d_model)
    ctx = model.context(torch.zeros(2, T, dtype=torch.long), None, None)
    return rc, model, dsa, x, ctx


def test_index_score_matches_per_head_loop(rel_err):
    rc, model, dsa, x, ctx = setup()
    ix = dsa.indexer
    _, _, _, _, q_resid = dsa.project(x, ctx)
    k = ix.keys(x, ctx)
    got = ix.scores(x, q_resid, k, ctx)
    from deepwish.model.rope import apply_rotary
    q = apply_rotary(ix.wq_b(q_resid).view(2, 20, ix.n_heads, ix.head_dim), ctx.cos, ctx.sin)
    w = x @ ix.weights_proj.weight.t()
    ref = torch.zeros(2, 20, 20)
    for h in range(ix.n_heads):
        ref += (w[..., h:h + 1] * ix.n_heads ** -0.5) * torch.relu(q[:, :, h] @ k.transpose(1, 2) * ix.head_dim ** -0.5)
    assert rel_err(ref, got) < 1e-5


def test_selection_is_causal_topk():
    rc, model, dsa, x, ctx = setup()
    scores = torch.randn(2, 20, 20)
    sel = dsa.indexer.select(scores, ctx.mask())[:, 0]
    counts = sel.sum(-1)
    assert torch.equal(counts[0], torch.clamp(torch.arange(1, 21), max=6))
    assert not torch.triu(sel[0], 1).any()
    row = 15
    allowed = scores[0, row, : row + 1]
    assert set(sel[0, row].nonzero().flatten().tolist()) == set(allowed.topk(6).indices.tolist())


def test_topk_covering_everything_equals_mla(rel_err):
    rc, model, dsa, x, ctx = setup(12, "model.index_topk=64")
    with torch.no_grad():
        out = dsa(x, ctx)[0]
        dense = dsa.attend_naive(*dsa.project(x, ctx)[:4], None, causal=True)
        dense = dsa.o_proj(dense.reshape(2, 12, -1))
    assert rel_err(dense, out) < 1e-5


@pytest.mark.parametrize("mode", ["dense_warmup", "sparse"])
def test_indexer_loss_reaches_only_the_indexer(mode):
    rc, model, dsa, x, ctx = setup()
    model.train()
    ctx = replace(ctx, dense_indexer_attention=mode == "dense_warmup", indexer_loss=True)
    out, aux = dsa(x, ctx)
    loss = aux.get("indexer")
    assert loss is not None and loss.item() > 0
    loss.backward(retain_graph=True)
    for n, p in dsa.named_parameters():
        has = p.grad is not None and p.grad.abs().sum() > 0
        assert has == n.startswith("indexer."), n
    dsa.zero_grad()
    out.square().sum().backward()  # the LM side never reaches the indexer
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in dsa.indexer.parameters())
    assert dsa.q_b_proj.weight.grad.abs().sum() > 0


def test_dense_warmup_attends_densely_sparse_does_not(rel_err):
    rc, model, dsa, x, ctx = setup()
    with torch.no_grad():
        dense = dsa.o_proj(dsa.attend_naive(*dsa.project(x, ctx)[:4], None, causal=True).reshape(2, 20, -1))
        assert rel_err(dense, dsa(x, replace(ctx, dense_indexer_attention=True))[0]) < 1e-5
        assert rel_err(dense, dsa(x, replace(ctx, dense_indexer_attention=False))[0]) > 1e-3
    assert model.context(torch.zeros(1, 4, dtype=torch.long)).dense_indexer_attention is False  # default: sparse


def test_kl_is_zero_when_indexer_matches_attention():
    mask = torch.ones(1, 1, 3, 4, dtype=torch.bool).tril()
    attn = torch.randn(1, 2, 3, 4)
    p = attn.masked_fill(~mask, float("-inf")).softmax(-1).sum(1)
    p = p / p.sum(-1, keepdim=True)
    assert indexer_kl(attn, p.clamp_min(1e-30).log(), mask).abs().item() < 1e-6
    assert indexer_kl(attn, torch.randn(1, 3, 4), mask).item() > 0


def test_decode_with_indexer_cache_equals_forward(rel_err):
    # 16 index heads: fewer exact-zero index scores (every head's relu 0), so fewer ties
    rc = tiny("model.index_n_heads=16")
    model = Transformer(rc.model).eval()
    randomise(model)
    x = torch.randint(0, 101, (2, 18))
    from deepwish.generate import decode_one_token, prefill
    with torch.no_grad():
        full = model(x).logits
        cache = model.make_cache(2, 24)
        assert isinstance(cache[0], DSACache) and cache[0].index_k.shape == (2, 24, rc.model.index_head_dim)
        steps = [prefill(model, x[:, :7], cache)]
        for t in range(7, 18):
            steps.append(decode_one_token(model, x[:, t], torch.full((2,), t), cache))
    assert rel_err(full[:, 6:], torch.stack(steps, 1)) < 1e-4


def test_modes_and_errors():
    rc = tiny()
    model = Transformer(rc.model)
    x = torch.randint(0, 101, (1, 8))
    with pytest.raises(ValueError, match="indexer mode"):
        model(x, targets=x, objective=Objective(indexer_mode="dense"))
    with pytest.raises(ValueError, match="q_lora_rank"):
        DSA(tiny("model.q_lora_rank=0").model, 0)


def test_loss_hook_adds_indexer_loss_with_coefficient():
    rc = tiny("train.indexer_mode=sparse", "train.indexer_loss_coef=0.5", "train.mtp_lambda=0")
    model = Transformer(rc.model).train()
    x, t = torch.randint(0, 101, (2, 16)), torch.randint(0, 101, (2, 16))
    loss, m = lm_loss(model, (x, t, None, None), rc.train, 32, backend="torch")
    one = model(x, targets=t, objective=Objective(indexer_mode="sparse", indexer_weight=1.0, loss_norm=32))
    assert m["aux/indexer"].item() == pytest.approx(0.5 * one.aux_losses["indexer"].item(), rel=1e-5)
    # the mode is an argument of the forward, never left on the model: a plain forward afterwards
    # (the end-of-run sample, `deepwish generate`) attends sparsely over the indexer's top-k
    assert not any(hasattr(b.mixer, "indexer_mode") for b in model.blocks)
    warm = model(x, targets=t, objective=Objective(indexer_mode="dense_warmup")).logits
    with torch.no_grad():
        assert torch.equal(model(x).logits, model(x, objective=Objective(indexer_mode="sparse")).logits)
        assert not torch.allclose(model(x).logits, warm)


def test_train_v32_tiny_logs_losses_and_learns(tmp_path):
    from deepwish.train import loop
    rc = load_config("deepseek_v32_tiny", [
        f"train.out_dir={tmp_path / 'run'}", "train.steps=14", "train.seq_len=48", "train.batch_size=4",
        "train.eval_every=14", "train.save_every=14", "train.eval_batches=1", "train.sample_tokens=0",
        "train.log_every=1", "train.warmup_steps=2", "train.optimizer=adamw", "train.lr=0.01",
        "train.device=cpu", "model.n_layers=2", "model.d_model=64", "model.index_topk=16"])
    s = loop.train(rc, progress_bar=False)
    losses = [s["train_losses"][k] for k in sorted(s["train_losses"])]
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3, losses
    import json
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    keys = set().union(*(r.keys() for r in train)) if train else set()
    flat = json.dumps(train)
    assert "aux/mtp" in flat and "aux/indexer" in flat and "max_load" in flat, keys


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["deepseek_v3_tiny", "deepseek_v32_tiny"])
def test_tiny_deepseek_runs_learn_on_gpu(preset, cuda, tmp_path, capsys):
    from deepwish.train import loop
    rc = load_config(preset, [f"train.out_dir={tmp_path}", "train.steps=60", "train.eval_every=30",
                              "train.log_every=10", "train.sample_tokens=16"])
    s = loop.train(rc, progress_bar=False)
    print(capsys.readouterr().out[-3000:])
    losses = [s["train_losses"][k] for k in sorted(s["train_losses"])]
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0, losses


def test_freeze_all_but_indexers_for_the_warmup():
    from deepwish.model.dsa import freeze_all_but_indexers
    rc = tiny("train.indexer_mode=dense_warmup", "train.mtp_lambda=0")
    model = Transformer(rc.model).train()
    names = freeze_all_but_indexers(model)
    assert names and all(".indexer." in n for n in names)
    x, t = torch.randint(0, 101, (2, 16)), torch.randint(0, 101, (2, 16))
    loss, _ = lm_loss(model, (x, t, None, None), rc.train, 32, backend="torch")
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and grads <= set(names)
    with pytest.raises(ValueError, match="no indexer"):
        freeze_all_but_indexers(Transformer(load_config("deepseek_v3_tiny", ["model.n_layers=1"]).model))


# ---- ties in the top-k selection -------------------------------------------------------------
def test_ties_go_to_the_most_recent_keys_whatever_the_row_length():
    from deepwish.model.dsa import select_topk_latest
    scores = torch.tensor([3.0, 0.0, 0.0, 5.0, 0.0, 0.0, 1.0])
    want = torch.tensor([True, False, False, True, False, True, True])  # 5, 3, 1, then the latest 0
    assert torch.equal(select_topk_latest(scores, torch.ones(7, dtype=torch.bool), 4), want)
    for pad in (1, 5, 93):  # invisible slots after the row (a longer cache) never change the choice
        s = torch.cat([scores, torch.zeros(pad)])
        vis = torch.cat([torch.ones(7, dtype=torch.bool), torch.zeros(pad, dtype=torch.bool)])
        assert torch.equal(select_topk_latest(s, vis, 4)[:7], want)
    assert torch.equal(select_topk_latest(torch.zeros(5), torch.tensor([1, 1, 0, 1, 0]).bool(), 9),
                       torch.tensor([1, 1, 0, 1, 0]).bool())  # fewer visible than k: all of them


def tied_model():
    """Layer 0's index scores are all exactly 0 (weights_proj = 0): every selection is a tie."""
    rc = tiny("model.index_topk=4")
    model = Transformer(rc.model).eval()
    randomise(model)
    with torch.no_grad():
        model.blocks[0].mixer.indexer.weights_proj.weight.zero_()
    return model


def test_tied_selection_is_the_same_for_every_cache_length_and_chunking():
    from deepwish.generate import prefill
    model = tied_model()
    x = torch.randint(0, 101, (1, 12), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(12)[None]
    with torch.no_grad():
        ref = model(x).logits
        for L in (12, 13, 40, 100):
            out = model(x, positions=pos, cache=model.make_cache(1, L)).logits
            assert torch.equal(out.argmax(-1), ref.argmax(-1)) and (out - ref).abs().max() < 1e-5, L
        cache = model.make_cache(1, 40)
        prefill(model, x[:, :5], cache)
        last = prefill(model, x[:, 5:], cache, start=5)
    assert (last - ref[:, -1]).abs().max() < 1e-5


def test_tied_selection_packed_equals_alone():
    model = tied_model()
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(0, 101, (1, 9), generator=g), torch.randint(0, 101, (1, 11), generator=g)
    packed = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(9), torch.arange(11)])[None]
    doc = torch.cat([torch.zeros(9), torch.ones(11)]).long()[None]
    with torch.no_grad():
        out = model(packed, positions=pos, doc_ids=doc).logits
        assert (out[:, :9] - model(a).logits).abs().max() < 1e-5
        assert (out[:, 9:] - model(b).logits).abs().max() < 1e-5


def test_tied_selection_generate_equals_uncached_greedy():
    from deepwish.generate import generate
    model = tied_model()
    seq = torch.randint(0, 101, (1, 12), generator=torch.Generator().manual_seed(2))
    got = generate(model, seq, 10)[0]
    with torch.no_grad():
        for _ in range(10):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert got == seq[0, 12:].tolist()
