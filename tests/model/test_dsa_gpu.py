"""DSA's fast path on the GPU (run with -m gpu): the row-block top-k at the released indexer size
(64 heads × 128, top-2048) selects the dense reference's set on CUDA; a small V3.2 model trains
one step on the fast path (Triton sparse_mla, bf16 autocast) with the dense reference's losses
and gradients to bf16 noise; its decode step captures as a CUDA graph and replays the eager
logits, and cached decoding equals the full forward."""
from dataclasses import replace

import pytest
import torch

from deepwish.config import load_config
from deepwish.model import Objective
from deepwish.model.dsa import select_topk_latest
from deepwish.model.dsa_rows import index_scores, topk_indices
from deepwish.model.transformer import Transformer

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("scorer", ["torch", "triton"])
def test_row_block_topk_equals_dense_at_real_size(cuda, scorer):
    T, Hi, Di, K = 4096, 64, 128, 2048
    g = torch.Generator(device=cuda).manual_seed(0)
    q = torch.randn(1, T, Hi, Di, device=cuda, dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, T, Di, device=cuda, dtype=torch.bfloat16, generator=g)
    w = torch.randn(1, T, Hi, device=cuda, generator=g) * Hi ** -0.5
    k[:, ::5] = -k[:, ::5].abs()  # a skewed key set: more heads at relu 0
    pos = torch.arange(T, device=cuda)[None]
    got = topk_indices(q, w, k, Di ** -0.5, K, pos, pos, causal_prefix=True, budget=1 << 24, scorer=scorer)
    assert got.shape == (1, T, K) and got.dtype == torch.int32
    for t0 in range(0, T, 512):  # the dense reference a slice of rows at a time
        rows = slice(t0, t0 + 512)
        scores = index_scores(q[:, rows], w[:, rows], k, Di ** -0.5)
        visible = pos[:, rows, None] >= pos[:, None, :]
        ref = select_topk_latest(scores, visible, K)
        mask = torch.zeros(1, 512, T + 1, dtype=torch.bool, device=cuda)
        mask.scatter_(-1, torch.where(got[:, rows] >= 0, got[:, rows].long(), T), True)
        # column T collects every -1 (a row with fewer than K visible keys): count real slots only
        assert torch.equal(mask[..., :T].sum(-1), ref.sum(-1))
        # cuBLAS may round a [C, t1] block's dot products apart from the [512, T] slice's by an ulp, and
        # the Triton scorer sums in its own order: a differing key must sit at the k-th score
        kth = scores.masked_fill(~visible, float("-inf")).topk(min(K, T), dim=-1).values[..., -1:]
        near = (scores - kth).abs() <= 1e-4 * kth.abs() + 1e-6
        differ = mask[..., :T] ^ ref
        assert (differ & ~near).sum() == 0 and differ.sum() <= 64, t0


def pair(cuda, *extra):
    rc = load_config("deepseek_v32_tiny", ["model.n_mtp=0", "model.index_topk=32", *extra])
    torch.manual_seed(0)
    fast = Transformer(rc.model).to(cuda)
    dense = Transformer(replace(rc.model, dsa_backend="torch")).to(cuda)
    dense.load_state_dict(fast.state_dict())
    assert fast.blocks[0].mixer.sparse_backend == "triton"
    return rc, fast, dense


def test_fast_training_step_equals_dense_in_bf16(cuda, rel_err):
    """bf16 noise measured, not guessed: the dense reference in fp32 is the truth; the fast path
    under bf16 autocast may stray from it at most a little more than the dense path under the
    same autocast does."""
    rc, fast, dense = pair(cuda)
    g = torch.Generator(device=cuda).manual_seed(1)
    x = torch.randint(0, rc.model.vocab_size, (2, 256), device=cuda, generator=g)
    t = torch.randint(0, rc.model.vocab_size, (2, 256), device=cuda, generator=g)
    obj = Objective(indexer_mode="sparse", indexer_weight=1.0)

    def run(m, bf16):
        m.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            out = m(x, targets=t, objective=obj)
        out.loss.backward()
        return out, {n: p.grad.float().clone() for n, p in m.named_parameters() if p.grad is not None}

    (truth, truth_g), (ref, ref_g), (got, got_g) = run(dense, False), run(dense, True), run(fast, True)
    assert got.loss.item() == pytest.approx(truth.loss.item(), rel=1e-2)
    assert got.aux_losses["indexer"].item() == pytest.approx(truth.aux_losses["indexer"].item(), rel=5e-2, abs=1e-4)
    assert set(got_g) == set(truth_g)
    for n in truth_g:
        noise = rel_err(truth_g[n], ref_g[n])
        assert rel_err(truth_g[n], got_g[n]) < 1.5 * noise + 1e-3, (n, noise)


def test_fast_decode_captures_and_equals_forward(cuda, rel_err):
    from deepwish.decode_graph import CapturedDecoder
    from deepwish.generate import decode_one_token, prefill
    rc, fast, dense = pair(cuda)
    fast, dense = fast.eval().to(torch.bfloat16), dense.eval().to(torch.bfloat16)
    x = torch.randint(0, rc.model.vocab_size, (1, 96), device=cuda)
    with torch.no_grad():
        full = dense(x).logits.float()
        cache = fast.make_cache(1, 128)
        step = CapturedDecoder(fast, cache)
        steps = [prefill(fast, x[:, :40], cache)]
        eager_cache = fast.make_cache(1, 128)
        prefill(fast, x[:, :40], eager_cache)
        for t in range(40, 96):
            pos = torch.full((1,), t, device=cuda)
            steps.append(step(fast, x[:, t], pos, cache).clone())
            eager = decode_one_token(fast, x[:, t], pos, eager_cache)
            assert rel_err(eager, steps[-1]) < 1e-3, t
    assert rel_err(full[:, 39:], torch.stack(steps, 1)) < 3e-2
