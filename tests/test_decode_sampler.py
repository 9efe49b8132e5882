"""generate with a decode_fn that samples itself (decode_graph.CapturedSampler's contract): the
same tokens as the eager path for the same seed. On the CPU nothing is captured, so a stand-in
with the sampler's contract (eager step + `sample` with its own generator) checks generate's side;
tests/test_decode_fused_gpu.py checks the captured sampler itself."""
import pytest
import torch

from deepwish.config import model_config
from deepwish.generate import SamplingConfig, decode_one_token, generate, sample
from deepwish.model.transformer import Transformer


class EagerSampler:
    returns_tokens = True

    def __init__(self, sampling: SamplingConfig):
        self.sampling = sampling
        self.generator = torch.Generator() if sampling.temperature > 0 else None
        self.buf = None

    def __call__(self, model, token, position, cache):
        s = self.sampling
        out = sample(decode_one_token(model, token, position, cache), s.temperature, s.top_k, s.top_p, self.generator)
        if self.buf is None:
            self.buf = out
        self.buf.copy_(out)  # one buffer, overwritten by each call, as a graph's output is
        return self.buf


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(model_config("qwen3_tiny")).eval()


@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(0.9, top_k=20),
                                      SamplingConfig(1.2, top_p=0.8), SamplingConfig(0.7, 10, 0.9)])
def test_token_step_equals_eager(model, sampling):
    prompts = [[5, 6, 7, 8], [9, 10]]  # unequal lengths: forced prompt tokens through the step too
    kw = dict(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
    ref = generate(model, prompts, 10, seed=3, **kw)
    got = generate(model, prompts, 10, seed=3, decode_fn=EagerSampler(sampling), **kw)
    assert got == ref
    if sampling.temperature > 0:  # the seed matters: another seed, another stream
        assert generate(model, prompts, 10, seed=4, decode_fn=EagerSampler(sampling), **kw) != ref


def test_sampling_mismatch_is_an_error(model):
    with pytest.raises(ValueError, match="samples with"):
        generate(model, [[1, 2]], 3, temperature=0.5, decode_fn=EagerSampler(SamplingConfig()))
