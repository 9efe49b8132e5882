"""Cache policy: a full cache is an error, never a silent wrap; sliding-window layers can run on
a ring cache of window (+ slack) slots and still equal the full windowed forward."""
import pytest
import torch

from deepwish.config import model_config
from deepwish.generate import decode_one_token, generate, prefill
from deepwish.model.cache import CacheFullError
from deepwish.model.ring_cache import RingKVCache, make_ring_cache
from deepwish.model.transformer import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")

WINDOW = 8


def _model(**kw):
    cfg = model_config("qwen3_tiny", n_layers=3, vocab_size=64, max_seq_len=256, init_std=0.1, **kw)
    return Transformer(cfg).eval()


@pytest.fixture(scope="module")
def swa():
    """All layers windowed."""
    return _model(mixer="swa", sliding_window=WINDOW)


@pytest.fixture(scope="module")
def hybrid():
    """Windowed layers with a full-attention layer every third layer (ring + full caches)."""
    return _model(mixer="swa", sliding_window=WINDOW, full_attention_interval=3, attn_mixer="gqa")


def _decode_all(model, cache, x, chunks):
    """Feed x [B, T] in chunks of the given sizes (1 = one-token decode); logits [B, T, V]."""
    out, t = [], 0
    B = x.shape[0]
    for n in chunks:
        if n == 1:
            out.append(decode_one_token(model, x[:, t], torch.full((B,), t), cache)[:, None])
        else:
            pos = torch.arange(t, t + n).expand(B, n)
            with torch.no_grad():
                out.append(model(x[:, t:t + n], positions=pos, cache=cache).logits)
        t += n
    return torch.cat(out, 1)


@pytest.mark.parametrize("which", ["swa", "hybrid"])
@pytest.mark.parametrize("chunks", [[5] + [1] * 35, [3, 11, 1, 1, 6, 1, 13], [20, 20]])
def test_ring_cache_equals_windowed_forward(request, rel_err, which, chunks):
    model = request.getfixturevalue(which)
    T = sum(chunks)
    x = torch.randint(0, 64, (2, T))
    with torch.no_grad():
        full = model(x).logits  # training path: windowed causal mask, no cache
    cache = make_ring_cache(model, 2, 64)
    rings = [c for c in cache.layers if isinstance(c, RingKVCache)]
    assert rings and all(c.slots == WINDOW for c in rings)
    got = _decode_all(model, cache, x, chunks)
    assert T > 4 * WINDOW // 2
    assert rel_err(full, got) < 1e-5


def test_ring_greedy_equals_full_cache(hybrid):
    prompt = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [1, 2, 3]]
    ref = generate(hybrid, prompt, 30)
    ring = make_ring_cache(hybrid, 2, 12 + 30)
    assert generate(hybrid, prompt, 30, cache=ring) == ref


def test_ring_stale_entries_are_hidden(swa, rel_err):
    """Rejected speculative tokens leave entries ahead of the accepted prefix; a later chunk
    from an earlier position must not see them (slack >= tokens written ahead)."""
    x = torch.randint(0, 64, (1, 30))
    junk = torch.randint(0, 64, (1, 4))
    with torch.no_grad():
        full = swa(x).logits
    cache = make_ring_cache(swa, 1, 64, slack=5)
    _decode_all(swa, cache, x[:, :20], [20])
    with torch.no_grad():  # 4 junk tokens at positions 20..23, then the real ones from 20 on
        swa(junk, positions=torch.arange(20, 24)[None], cache=cache).logits
        got = swa(x[:, 20:23], positions=torch.arange(20, 23)[None], cache=cache).logits
    assert rel_err(full[:, 20:23], got) < 1e-5
    tail = _decode_all_from(swa, cache, x, 23)
    assert rel_err(full[:, 23:], tail) < 1e-5


def _decode_all_from(model, cache, x, start):
    return torch.cat([decode_one_token(model, x[:, t], torch.tensor([t]), cache)[:, None]
                      for t in range(start, x.shape[1])], 1)


def test_ring_needs_a_windowed_model():
    with pytest.raises(ValueError, match="no sliding-window"):
        make_ring_cache(_model(), 1, 16)


def test_decode_past_the_cache_is_an_error():
    model = _model()
    cache = model.make_cache(1, 8)
    prefill(model, torch.randint(0, 64, (1, 8)), cache)
    with pytest.raises(CacheFullError, match="8"):
        decode_one_token(model, torch.tensor([1]), torch.tensor([8]), cache)
    with pytest.raises(CacheFullError, match="exceeds the cache length 8"):
        prefill(model, torch.randint(0, 64, (1, 3)), cache, start=6)
    with pytest.raises(CacheFullError, match="holds 8"):
        generate(model, [[1, 2, 3, 4, 5]], 5, cache=model.make_cache(1, 8))


def test_ring_cache_positions_still_bounded(swa):
    """A ring cache bounds positions by its max_len like any cache (no silent wrap of positions)."""
    cache = make_ring_cache(swa, 1, 16)
    with pytest.raises(CacheFullError):
        decode_one_token(swa, torch.tensor([1]), torch.tensor([16]), cache)


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
@pytest.mark.parametrize("T", [1, 6])
def test_cached_attention_folds_groups_exactly(rel_err, backend, T):
    """The cached path folds grouped query heads into query rows instead of repeating keys."""
    from deepwish.model.attention import sdpa, sdpa_folded_groups
    q, k, v = torch.randn(2, 8, T, 16), torch.randn(2, 2, 19, 16), torch.randn(2, 2, 19, 12)
    mask = torch.rand(2, 1, T, 19) > 0.4
    mask[..., 0] = True
    assert rel_err(sdpa(q, k, v, mask, 0.25, False, backend), sdpa_folded_groups(q, k, v, mask, 0.25, backend)) < 1e-6
