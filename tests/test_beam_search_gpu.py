"""Beam search with the decode step captured as a CUDA graph (run on the device machine:
pytest -m gpu): the cache is reordered in place, so the graph keeps reading it, and the
hypotheses equal the eager beam search's, for every cache kind."""
import pytest
import torch

from deepwish.config import model_config
from deepwish.decode_graph import CapturedDecoder
from deepwish.generate import beam_search
from deepwish.model.transformer import Transformer

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("preset", ["qwen3_tiny", "deepseek_v3_tiny", "deepseek_v32_tiny", "qwen3_next_tiny"])
def test_captured_beam_search_equals_eager(cuda, preset):
    torch.manual_seed(0)
    model = Transformer(model_config(preset, n_layers=2)).eval().to(cuda)
    prompt = torch.randint(0, model.cfg.vocab_size, (9,)).tolist()
    N, n = 4, 16
    eager = beam_search(model, prompt, n, N, num_return_sequences=N)
    cache = model.make_cache(N, len(prompt) + n)
    step = CapturedDecoder(model, cache)
    got = beam_search(model, prompt, n, N, num_return_sequences=N, cache=cache, decode_fn=step)
    assert [t for t, _ in got] == [t for t, _ in eager]
    for (_, a), (_, b) in zip(got, eager):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-4)
