"""Rollouts: the sampler's recorded log-probabilities equal a full forward's; the group shares
one prefill; stop tokens end rows; sampling is seeded."""
import pytest
import torch

from deepwish.config import model_config
from deepwish.generate import SamplingConfig, generate
from deepwish.model import Transformer
from deepwish.rl.rollout import completion_logprobs, rollout, sampling_log_probs
from deepwish.generate import sampling_probs


def _model(preset="qwen3_tiny", **kw):
    torch.manual_seed(0)
    return Transformer(model_config(preset, n_layers=2, vocab_size=48, max_seq_len=64, **kw)).eval()


@pytest.mark.parametrize("sampling", [SamplingConfig(1.0), SamplingConfig(0.7, top_k=5),
                                      SamplingConfig(1.3, top_p=0.8)])
@pytest.mark.parametrize("head_fp32", [False, True])
def test_rollout_logprobs_equal_full_forward(sampling, head_fp32):
    model = _model()
    prompts = [[3, 4, 5], [7, 8], [9, 10, 11, 12]]  # three lengths: prefill grouped by length
    gen = torch.Generator().manual_seed(0)
    roll = rollout(model, prompts, group_size=3, max_new_tokens=7, sampling=sampling, stop_tokens=[1, 2],
                   generator=gen, head_fp32=head_fp32)
    T = roll.logprobs.shape[1]
    with torch.no_grad():
        logp, ent = completion_logprobs(model, roll.tokens, roll.prompt_lens, T, sampling, with_entropy=True,
                                        head_fp32=head_fp32)
    mask = roll.completion_mask
    assert mask.sum() > 20
    torch.testing.assert_close(logp[mask], roll.logprobs[mask], rtol=0, atol=2e-5)
    assert torch.isfinite(logp[mask]).all() and (ent[mask] >= 0).all()
    # rows are (prompt, sample): each row starts with its prompt; stops end a row and are counted
    for i, row in enumerate(roll.completions()):
        p = prompts[i // 3]
        assert roll.tokens[i, :len(p)].tolist() == p
        stopped = bool(row) and row[-1] in (1, 2)
        assert stopped == (not bool(roll.truncated[i]))
        assert all(t not in (1, 2) for t in row[:-1])


def test_sampler_distribution_is_generates():
    logits = torch.randn(4, 30)
    for s in (SamplingConfig(0.9), SamplingConfig(1.0, top_k=4), SamplingConfig(1.0, top_p=0.5)):
        torch.testing.assert_close(sampling_log_probs(logits, s.temperature, s.top_k, s.top_p).exp(),
                                   sampling_probs(logits, s.temperature, s.top_k, s.top_p))


def test_greedy_rollout_matches_generate_and_group_copies_are_identical():
    model = _model()
    prompts = [[3, 4, 5], [7, 8]]
    roll = rollout(model, prompts, group_size=2, max_new_tokens=6, sampling=SamplingConfig(0.0))
    ref = generate(model, prompts, 6, temperature=0.0)
    got = roll.completions()
    assert got[0] == got[1] == ref[0] and got[2] == got[3] == ref[1]


def test_recurrent_cache_rollout_equals_forward():
    """Gated DeltaNet layers: the group copy carries the recurrent and conv states."""
    torch.manual_seed(0)
    model = Transformer(model_config("qwen3_next_tiny", n_layers=2, vocab_size=48, max_seq_len=64, n_experts=4,
                                     gdn_backend="torch")).eval()
    s = SamplingConfig(1.0)
    roll = rollout(model, [[3, 4, 5], [7, 8]], group_size=2, max_new_tokens=5, sampling=s,
                   generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logp, _ = completion_logprobs(model, roll.tokens, roll.prompt_lens, roll.logprobs.shape[1], s)
    mask = roll.completion_mask
    torch.testing.assert_close(logp[mask], roll.logprobs[mask], rtol=0, atol=2e-5)


def test_seeded_and_errors():
    model = _model()
    s = SamplingConfig(1.0)
    a = rollout(model, [[3, 4]], 4, 5, s, generator=torch.Generator().manual_seed(5))
    b = rollout(model, [[3, 4]], 4, 5, s, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.tokens, b.tokens)
    cache = model.make_cache(3, 16)
    with pytest.raises(ValueError, match="group cache holds 3 rows"):
        rollout(model, [[3, 4]], 4, 5, s, cache=cache)
