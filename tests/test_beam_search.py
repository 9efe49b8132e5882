"""Beam search over the static caches: exact against HF transformers' beam search on a random
tiny Qwen3 (tokens and scores, for length penalties, every early_stopping mode, stop tokens and
several returned hypotheses), and `ModelCache.reorder` exact for every cache kind (KV, MLA
latent, DSA indexer keys, ring, Gated DeltaNet conv and recurrent states)."""
import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from deepwish import load_hf
from deepwish.config import load_config
from deepwish.generate import beam_search, decode_one_token, generate, prefill
from deepwish.model import Transformer
from deepwish.model.ring_cache import make_ring_cache
from tests.hf.hf_utils import random_hf_model

CFG = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, max_position_embeddings=256,
           rms_norm_eps=1e-6, num_attention_heads=4, num_key_value_heads=2, head_dim=12)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = random_hf_model(Qwen3ForCausalLM, Qwen3Config(**CFG), seed=0)
    path = tmp_path_factory.mktemp("qwen3_beam")
    hf.save_pretrained(path)
    return hf, load_hf(path, dtype=torch.float32)


def hf_beams(hf, prompt, n_new, num_beams, length_penalty, early_stopping, eos, n_return):
    """HF's hypotheses as (new tokens up to and including the stop token, score)."""
    pad = eos if eos is not None else 0
    out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_new, do_sample=False,
                      num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
                      eos_token_id=eos, pad_token_id=pad, num_return_sequences=n_return,
                      return_dict_in_generate=True, output_scores=True)
    res = []
    for row, score in zip(out.sequences[:, prompt.shape[1]:].tolist(), out.sequences_scores.tolist()):
        if eos is not None and eos in row:
            row = row[:row.index(eos) + 1]
        res.append((row, score))
    return res


PROMPT = [[5, 17, 42, 8, 61, 23, 9]]


@pytest.mark.parametrize("num_beams,length_penalty,early_stopping,use_eos,n_return,stopped", [
    (3, 1.0, False, False, 1, False),
    (4, 0.0, "never", True, 2, True),
    (3, 2.0, True, True, 3, True),
    (2, -0.5, False, True, 1, True),
    (4, 1.5, "never", True, 1, False),  # a length bonus: the best hypothesis runs to the limit
])
def test_beam_search_equals_hf(pair, num_beams, length_penalty, early_stopping, use_eos, n_return, stopped):
    hf, ours = pair
    prompt = torch.tensor(PROMPT)
    greedy = generate(ours, prompt, 8)[0]
    # A stop token the model actually produces (the greedy path's 3rd token), so hypotheses finish early.
    eos = greedy[2] if use_eos else None
    ref = hf_beams(hf, prompt, 10, num_beams, length_penalty, early_stopping, eos, n_return)
    got = beam_search(ours, PROMPT[0], 10, num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
                      stop_tokens=[eos] if eos is not None else (), num_return_sequences=n_return)
    assert [t for t, _ in got] == [t for t, _ in ref]
    for (_, s), (_, r) in zip(got, ref):
        assert s == pytest.approx(r, rel=1e-4, abs=1e-5)
    # whether a returned hypothesis ended at the stop token (so both ways of finishing are covered)
    assert any(t[-1] == eos for t, _ in got) == stopped
    # generate(num_beams=) returns the best hypothesis
    assert generate(ours, PROMPT, 10, num_beams=num_beams, length_penalty=length_penalty,
                    early_stopping=early_stopping, stop_tokens=[eos] if eos is not None else ())[0] == got[0][0]


def test_beams_beat_greedy_and_one_beam_is_greedy(pair):
    _, ours = pair
    greedy = generate(ours, PROMPT, 10)[0]
    one = beam_search(ours, PROMPT[0], 10, 1)
    assert one[0][0] == greedy

    def logprob(tokens):
        ids = torch.tensor([PROMPT[0] + tokens])
        lp = ours(ids).logits[0, len(PROMPT[0]) - 1:-1].float().log_softmax(-1)
        return float(lp.detach().gather(1, torch.tensor(tokens)[:, None]).sum())
    (best, score), = beam_search(ours, PROMPT[0], 10, 4, length_penalty=0.0)
    assert score == pytest.approx(logprob(best), abs=1e-4)  # the score is the sequence's log-probability
    assert logprob(best) >= logprob(greedy) - 1e-5


def test_beam_search_bad_arguments(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="temperature 0"):
        generate(ours, PROMPT, 4, num_beams=2, temperature=0.7)
    with pytest.raises(ValueError, match="cache of batch 3"):
        beam_search(ours, PROMPT[0], 4, 3, cache=ours.make_cache(2, 16))
    with pytest.raises(ValueError, match="num_return_sequences"):
        beam_search(ours, PROMPT[0], 4, 2, num_return_sequences=3)


def _swa_model():
    cfg = load_config("qwen3_tiny", ["model.n_layers=2", "model.mixer=swa", "model.sliding_window=4"]).model
    return Transformer(cfg).eval()


@pytest.mark.parametrize("kind", ["qwen3_tiny", "deepseek_v3_tiny", "deepseek_v32_tiny", "qwen3_next_tiny", "ring"])
def test_reorder_equals_a_cache_built_in_the_new_order(kind):
    """Prefill 3 different prompts, reorder the rows [2, 0, 0] in place, decode 3 more steps;
    the logits equal a fresh cache prefilled with the prompts in that order."""
    torch.manual_seed(0)
    if kind == "ring":
        model = _swa_model()
        make = lambda: make_ring_cache(model, 3, 32)  # noqa: E731
    else:
        model = Transformer(load_config(kind, ["model.n_layers=2"]).model).eval()
        make = lambda: model.make_cache(3, 32)  # noqa: E731
    V = model.cfg.vocab_size
    prompts = torch.randint(0, V, (3, 9))
    index = torch.tensor([2, 0, 0])
    cache = make()
    prefill(model, prompts, cache)
    k_before = [t.data_ptr() for c in cache.layers for t in vars(c).values() if isinstance(t, torch.Tensor)]
    cache.reorder(index)
    assert [t.data_ptr() for c in cache.layers for t in vars(c).values() if isinstance(t, torch.Tensor)] == k_before
    ref = make()
    prefill(model, prompts[index], ref)
    steps = torch.randint(0, V, (3, 3))
    first = None
    for j in range(3):
        pos = torch.full((3,), 9 + j)
        a = decode_one_token(model, steps[:, j], pos, cache)
        b = decode_one_token(model, steps[:, j], pos, ref)
        # equal up to the summation order of differently batched prefills
        assert float((a - b).norm() / b.norm()) < 1e-5, (kind, j, float((a - b).abs().max()))
        first = b if first is None else first
    # the check has teeth: without the reorder the rows differ
    plain = make()
    prefill(model, prompts, plain)
    a = decode_one_token(model, steps[:, 0], torch.full((3,), 9), plain)
    assert float((a[0] - first[0]).norm() / first[0].norm()) > 1e-2