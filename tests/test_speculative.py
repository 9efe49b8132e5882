"""Speculative decoding: greedy output equals plain greedy decoding token for token (KV, ring and
recurrent caches, drafts that agree always / sometimes / almost never), the sampled output
follows the target distribution exactly (chi-square against enumeration on a vocabulary of 8),
and the draft is dropped with a notice when it stops paying."""
import math

import pytest
import torch

from deepwish.config import model_config
from deepwish.generate import generate, sampling_probs
from deepwish.model.ring_cache import make_ring_cache
from deepwish.model.transformer import Transformer
from deepwish.speculative import speculative_generate

pytestmark = pytest.mark.usefixtures("one_thread")

V = 64


def _model(preset="qwen3_tiny", **kw):
    cfg = model_config(preset, **{"n_layers": 2, "vocab_size": V, "max_seq_len": 256, "init_std": 0.1, **kw})
    return Transformer(cfg).eval()


@pytest.fixture(scope="module")
def target():
    return _model(tie_embeddings=False)


@pytest.fixture(scope="module")
def drafts(target):
    noisy, adversarial = _model(tie_embeddings=False), _model(tie_embeddings=False)
    with torch.no_grad():
        for p, q in zip(noisy.parameters(), target.parameters()):
            p.copy_(q + 0.3 * q.std() * torch.randn_like(q) if q.dim() > 1 else q)
        adversarial.load_state_dict(target.state_dict())
        adversarial.lm_head.weight.neg_()  # its argmax is the target's argmin: never agrees
    return {"self": target, "noisy": noisy, "adversarial": adversarial,
            "random": _model(n_layers=1, d_model=64, head_dim=16)}


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("which", ["self", "noisy", "random", "adversarial"])
def test_greedy_equals_plain_greedy(target, drafts, which, k):
    prompt = torch.randint(0, V, (7,)).tolist()
    ref = generate(target, [prompt], 40)[0]
    out, stats = speculative_generate(target, drafts[which], prompt, 40, k=k, fallback=False)
    assert out == ref
    assert stats.new_tokens == 40 and stats.proposed >= stats.accepted
    if which == "self":
        assert stats.acceptance_rate == 1.0
        assert stats.target_forwards <= math.ceil(40 / (k + 1)) + 1
    if which == "adversarial":
        assert stats.accepted == 0 and stats.rounds == 39  # every round rejects at its first draft token


def test_draft_dropped_when_it_stops_paying(target, drafts, capsys):
    prompt = [1, 2, 3]
    out, stats = speculative_generate(target, drafts["adversarial"], prompt, 30, k=4, window=4, cost_ratio=0.2)
    captured = capsys.readouterr()
    assert "draft dropped" in captured.err and "draft dropped" not in captured.out  # stdout carries only text
    assert stats.fallback_at is not None and stats.rounds == 4
    assert out == generate(target, [prompt], 30)[0]


def test_stop_token_and_length_one(target, drafts):
    prompt = [4, 5, 6]
    free = generate(target, [prompt], 12)[0]
    stop = free[5]
    out, _ = speculative_generate(target, drafts["self"], prompt, 12, k=4, stop_tokens=[stop])
    assert out == free[: free.index(stop) + 1]
    assert speculative_generate(target, drafts["noisy"], prompt, 1, k=4)[0] == free[:1]


def test_recurrent_target_and_draft():
    """Gated DeltaNet caches are snapshotted and restored after a rejection."""
    hybrid = _model("qwen3_next_tiny", n_layers=4)
    small = _model(n_layers=1)
    recurrent_draft = _model("qwen3_next_tiny", n_layers=2, full_attention_interval=2)
    prompt = torch.randint(0, V, (6,)).tolist()
    ref = generate(hybrid, [prompt], 24)[0]
    for draft in (small, hybrid):
        out, stats = speculative_generate(hybrid, draft, prompt, 24, k=3, fallback=False)
        assert out == ref
    ref_small = generate(small, [prompt], 24)[0]
    out, stats = speculative_generate(small, recurrent_draft, prompt, 24, k=3, fallback=False)
    assert out == ref_small and stats.accepted < stats.proposed


def test_ring_cache_target():
    swa = _model(n_layers=3, sliding_window=6, mixer="swa", full_attention_interval=3, attn_mixer="gqa")
    draft = _model(n_layers=1)
    prompt = torch.randint(0, V, (9,)).tolist()
    ref = generate(swa, [prompt], 30)[0]
    with pytest.raises(ValueError, match="slack"):
        speculative_generate(swa, draft, prompt, 30, k=3, target_cache=make_ring_cache(swa, 1, 40, slack=2))
    out, _ = speculative_generate(swa, draft, prompt, 30, k=3, fallback=False,
                                  target_cache=make_ring_cache(swa, 1, 40, slack=4))
    assert out == ref


def _chi2_critical(df: int, z: float = 4.265) -> float:
    """Upper 1e-5 quantile of chi-square(df), Wilson-Hilferty approximation."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_sampled_tokens_follow_the_target():
    """Joint law of the first two tokens over many runs (k=2, so both come from one round's
    accept/resample whenever the first draft passes) against the target's exact law."""
    torch.manual_seed(2)  # random models whose filtered supports overlap: both paths run (seed 0: none)
    small = dict(n_layers=1, vocab_size=8, d_model=16, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32, init_std=0.6)
    target, draft = _model(**small), _model(**small)
    filters = dict(temperature=0.8, top_k=6, top_p=0.95)  # the filters must shape p and q alike
    prompt = [1, 2, 3]
    with torch.no_grad():
        p1 = sampling_probs(target(torch.tensor([prompt])).logits[:, -1], **filters)[0]
        nxt = torch.tensor([prompt + [a] for a in range(8)])
        p2 = sampling_probs(target(nxt).logits[:, -1], **filters)  # [8, 8]: p(x2 | x1)
    exact = (p1[:, None] * p2).reshape(-1).double()
    N = 2500
    counts = torch.zeros(64, dtype=torch.float64)
    accepted = proposed = 0
    for _ in range(N):
        out, st = speculative_generate(target, draft, prompt, 3, k=2, fallback=False, **filters)
        counts[out[0] * 8 + out[1]] += 1
        accepted += st.accepted
        proposed += st.proposed
    assert 0 < accepted < proposed  # both the accept and the resample paths ran
    expected = exact * N
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    chi2 = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    assert counts[exact == 0].sum() == 0, "a token outside the filtered target support was emitted"
    assert chi2 < _chi2_critical(int(keep.sum()) - 1), (chi2, int(keep.sum()))
    tv = 0.5 * float((counts / N - exact).abs().sum())
    assert tv < 0.12


# ---- self-speculation with DeepSeek-V3 MTP modules ------------------------------------------------
def _mtp_model(n_mtp):
    return _model("deepseek_v3_tiny", n_layers=2, n_mtp=n_mtp)


def test_mtp_forward_with_cache_matches_training_path(rel_err):
    from deepwish.model.mtp import mtp_hidden_states
    model = _mtp_model(1)
    x = torch.randint(0, V, (1, 12))
    with torch.no_grad():
        h = model(x, return_hidden=True).hidden
        ref = mtp_hidden_states(model, h, x)[0][:, :-1]  # the last position's target wraps
        cache = model.make_mtp_caches(1, 16)[0]
        pos = torch.arange(11)[None]
        a = model.mtp_hidden(1, h[:, :5], x[:, 1:6], pos[:, :5], cache=cache)  # in two chunks
        b = model.mtp_hidden(1, h[:, 5:11], x[:, 6:12], pos[:, 5:], cache=cache)
    assert rel_err(ref, torch.cat([a, b], 1)) < 1e-5


@pytest.mark.parametrize("n_mtp", [1, 2])
@pytest.mark.parametrize("prompt_len", [1, 6])
def test_mtp_greedy_equals_plain_greedy(n_mtp, prompt_len):
    from deepwish.speculative import mtp_speculative_generate
    model = _mtp_model(n_mtp)
    prompt = torch.randint(0, V, (prompt_len,)).tolist()
    ref = generate(model, [prompt], 25)[0]
    out, stats = mtp_speculative_generate(model, prompt, 25, fallback=False)
    assert out == ref
    assert stats.rounds > 0 and stats.proposed <= stats.rounds * n_mtp and stats.target_forwards < 25 + 2


def test_mtp_drafts_come_from_the_exact_prefix(monkeypatch, rel_err):
    """Every depth-1 output computed during speculation (cached, chunk by chunk, across rejections)
    equals the training-path MTP hidden state of the final sequence at that position."""
    import deepwish.speculative as spec
    from deepwish.model.mtp import mtp_hidden_states
    model = _mtp_model(1)
    seen = []
    inner = model.mtp_hidden

    def record(depth, h_prev, ahead, positions=None, doc_ids=None, cache=None):
        out = inner(depth, h_prev, ahead, positions, doc_ids, cache)
        if depth == 1 and cache is not None:  # speculation's cached calls, not the reference below
            seen.append((positions[0].clone(), out[0].clone()))
        return out

    monkeypatch.setattr(model, "mtp_hidden", record)
    prompt = torch.randint(0, V, (5,)).tolist()
    out, stats = spec.mtp_speculative_generate(model, prompt, 30, fallback=False)
    seq = torch.tensor([prompt + out])
    with torch.no_grad():
        ref = mtp_hidden_states(model, model(seq, return_hidden=True).hidden, seq)[0][0]
    assert len(seen) == stats.rounds
    for pos, h in seen:
        assert rel_err(ref[pos], h) < 1e-5


def test_mtp_sampled_runs_and_is_seeded():
    from deepwish.speculative import mtp_speculative_generate
    model = _mtp_model(2)
    a = mtp_speculative_generate(model, [1, 2, 3], 12, temperature=1.0, top_p=0.9, seed=3)[0]
    b = mtp_speculative_generate(model, [1, 2, 3], 12, temperature=1.0, top_p=0.9, seed=3)[0]
    assert a == b and len(a) == 12
    with pytest.raises(ValueError, match="no MTP"):
        mtp_speculative_generate(_model(), [1], 4)


def test_step_callable_serves_every_feed(target, drafts):
    """A `step` (what CapturedSteps is on GPU) replaces the eager forward for every chunk."""
    from deepwish.decode_graph import chunk_logits
    calls = {"target": [], "draft": []}

    def recording(who):
        def step(model, tokens, positions, cache):
            calls[who].append(tokens.shape[1])
            return chunk_logits(model, tokens, positions, cache)
        return step

    prompt = [9, 8, 7]
    tc, dc = target.make_cache(1, 40), drafts["noisy"].make_cache(1, 40)
    out, st = speculative_generate(target, drafts["noisy"], prompt, 30, k=3, fallback=False, target_cache=tc,
                                   draft_cache=dc, target_step=recording("target"), draft_step=recording("draft"))
    assert out == generate(target, [prompt], 30)[0]
    assert len(calls["target"]) == st.target_forwards and len(calls["draft"]) == st.draft_forwards
    assert set(calls["target"][1:]) <= {1, 2, 3, 4} and set(calls["draft"][1:]) <= {1, 2}
    fake = recording("target")
    fake.cache = target.make_cache(1, 40)  # a step bound to some other cache
    with pytest.raises(ValueError, match="another cache"):
        speculative_generate(target, drafts["noisy"], prompt, 5, target_cache=tc, target_step=fake)
