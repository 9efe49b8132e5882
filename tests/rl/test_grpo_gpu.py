"""GPU: rollouts through the captured decode step under bf16 autocast agree with the trainer's
full forward (the mismatch the trainer logs), and the group copy leaves the graph's cache in place."""
import pytest
import torch

from deepwish.config import model_config
from deepwish.decode_graph import CapturedDecoder
from deepwish.generate import SamplingConfig
from deepwish.model import Transformer
from deepwish.rl.loss import mismatch_share
from deepwish.generate import decode_one_token
from deepwish.rl.rollout import completion_logprobs, decode_fp32_head, rollout
from deepwish.rl.trainer import autocast

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("head_fp32", [False, True])
def test_captured_rollout_matches_forward_in_bf16(head_fp32):
    torch.manual_seed(0)
    model = Transformer(model_config("qwen3_tiny", n_layers=2, vocab_size=512, max_seq_len=256)).cuda().eval()
    P, G, T = 4, 8, 64
    cache = model.make_cache(P * G, 128, dtype=torch.bfloat16)
    with autocast(torch.device("cuda"), "bf16"):
        step = CapturedDecoder(model, cache, step=decode_fp32_head if head_fp32 else decode_one_token)
        s = SamplingConfig(1.0)
        roll = rollout(model, [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]], G, T, s, cache=cache, decode_fn=step,
                       generator=torch.Generator("cuda").manual_seed(0), head_fp32=head_fp32)
        with torch.no_grad():
            logp, _ = completion_logprobs(model, roll.tokens, roll.prompt_lens, roll.logprobs.shape[1], s,
                                          head_fp32=head_fp32)
    share = mismatch_share(logp.float(), roll.logprobs, roll.completion_mask)
    assert share <= 0.01, share
    assert roll.new_tokens == P * G * T
