"""Generation: static cache, sampling filters, ragged batches, stop tokens, clear errors."""
import pytest
import torch

from deepwish.config import model_config
from deepwish.generate import generate, sample
from deepwish.model.cache import CacheFullError
from deepwish.model.transformer import Transformer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(model_config("qwen3_tiny", n_layers=2, vocab_size=64, max_seq_len=128)).eval()


def test_ragged_batch_equals_one_by_one(model):
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    together = generate(model, prompts, 10)
    alone = [generate(model, [p], 10)[0] for p in prompts]
    assert together == alone


def test_greedy_matches_argmax_of_full_forward(model):
    prompt = [3, 1, 4, 1, 5]
    out = generate(model, [prompt], 6)[0]
    seq = list(prompt)
    for _ in range(6):
        with torch.no_grad():
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert out == seq[len(prompt):]


def test_stop_token_ends_row(model):
    prompt = [3, 1, 4]
    free = generate(model, [prompt], 8)[0]
    stop = free[2]
    out = generate(model, [prompt], 8, stop_tokens=[stop])[0]
    assert out == free[: free.index(stop) + 1]


def test_overlong_prompt_is_a_clear_error(model):
    with pytest.raises(CacheFullError, match="cache"):
        generate(model, [[1] * 100], 50, cache_len=120)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.make_cache(1, 4096)


def test_sampling_seeded_and_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    top1 = sample(logits, temperature=1.0, top_k=1, generator=g)
    assert (top1 == 3).all()
    topk2 = sample(logits, temperature=1.0, top_k=2, generator=g)
    assert set(topk2.unique().tolist()) == {2, 3}
    p = torch.softmax(logits[0], -1)  # [.032, .087, .237, .644]
    topp = sample(logits, temperature=1.0, top_p=0.7, generator=g)  # keeps {3, 2}
    assert set(topp.unique().tolist()) == {2, 3}
    frac3 = (topp == 3).float().mean().item()
    assert abs(frac3 - p[3] / (p[2] + p[3])) < 0.05


def test_sampled_generation_reproducible(model):
    a = generate(model, [[1, 2]], 8, temperature=1.0, top_p=0.9, seed=7)
    b = generate(model, [[1, 2]], 8, temperature=1.0, top_p=0.9, seed=7)
    assert a == b
