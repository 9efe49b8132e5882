"""The trainer drops document ids from a batch whose rows each hold one document (the plain causal
path is exact there) and keeps them otherwise; every family's loss is the same either way."""
import pytest
import torch

from deepwish.config import load_config
from deepwish.model.transformer import Transformer
from deepwish.train.loop import to_device


def _batch(doc_ids):
    B, T = doc_ids.shape
    ids = torch.randint(0, 100, (B, T))
    return ids, ids.roll(-1, 1), doc_ids, torch.arange(T).expand(B, T).clone()


def test_single_document_rows_drop_doc_ids():
    one = torch.zeros(2, 8, dtype=torch.int32)
    one[1] = 3  # a row of one document whose id is not 0
    assert to_device(_batch(one), torch.device("cpu"))[2] is None
    two = one.clone()
    two[1, 5:] = 4
    kept = to_device(_batch(two), torch.device("cpu"))[2]
    assert torch.equal(kept, two)
    assert to_device(_batch(one)[:2] + (None, None), torch.device("cpu"))[2] is None


@pytest.mark.parametrize("preset", ["qwen3_tiny", "qwen3_next_tiny", "deepseek_v3_tiny"])
def test_one_document_rows_equal_plain_input(preset):
    rc = load_config(preset, ["model.attn_backend=torch"])
    torch.manual_seed(0)
    model = Transformer(rc.model)
    ids = torch.randint(0, rc.model.vocab_size, (2, 24))
    targets = ids.roll(-1, 1)
    pos = torch.arange(24).expand(2, 24)
    packed = model(ids, positions=pos, doc_ids=torch.full((2, 24), 2, dtype=torch.int32), targets=targets)
    plain = model(ids, positions=pos, doc_ids=None, targets=targets)
    torch.testing.assert_close(plain.loss, packed.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(plain.logits, packed.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_to_device_does_not_wait_for_queued_gpu_work(cuda):
    """The batch's host-to-device copies are queued behind the GPU's work, not waited for: the host
    returns from to_device while a long kernel still runs (a pageable copy would wait for it)."""
    import time
    batch = _batch(torch.arange(2 * 2048, dtype=torch.int32).view(2, 2048) // 700)
    to_device(batch, cuda)  # the pinned host blocks are allocated once, then cached
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU time queued
    t0 = time.perf_counter()
    got = to_device(batch, cuda)
    host_s = time.perf_counter() - t0
    torch.cuda.synchronize()
    assert host_s < 0.2, f"to_device blocked the host {host_s:.2f} s"
    for a, b in zip(got, batch):
        assert torch.equal(a.cpu(), b)
