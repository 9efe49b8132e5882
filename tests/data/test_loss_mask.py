"""Loss masks end to end: the shard channel (and version-1 shards without it), the loader's
ignored targets, exactly-zero gradient on masked positions, the global normaliser across
micro-batches, and the fused path skipping ignored rows."""
import struct

import numpy as np
import pytest
import torch

from deepwish.config import TrainConfig, model_config
from deepwish.data.loader import IGNORE_INDEX, PackedLoader, sequential_batches, unigram_entropy, window_batch
from deepwish.data.shards import (FINGERPRINT_BYTES, HEADER_BYTES, MAGIC, ShardError, count_loss_targets, open_shard,
                                  read_header, write_shard)
from deepwish.data.validate import data_problems
from deepwish.model import Transformer
from deepwish.model.objective import Objective, cross_entropy_sums
from deepwish.train.loss import count_targets, lm_loss

VOCAB = 64
TINY = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64, max_seq_len=64)


def chat_like_docs(n_docs=12, seed=0):
    """Documents of a 'prompt' (mask 0) then a 'reply' (mask 1) then eos 0 (mask 0)."""
    rng = np.random.default_rng(seed)
    docs, masks = [], []
    for _ in range(n_docs):
        p, r = int(rng.integers(2, 9)), int(rng.integers(1, 7))
        docs.append(rng.integers(1, VOCAB, p + r).tolist() + [0])
        masks.append([0] * p + [1] * r + [0])
    return docs, masks


def write_v1_shard(path, docs, vocab_size, fingerprint):
    """A shard exactly as format version 1 wrote it (no flags word, no mask)."""
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    offsets = np.zeros(len(docs) + 1, dtype="<i8")
    np.cumsum(lengths, out=offsets[1:])
    head = struct.pack(f"<8sIIQQQ{FINGERPRINT_BYTES}s", MAGIC, 1, 2, int(offsets[-1]), vocab_size, len(docs),
                       fingerprint.encode())
    body = np.concatenate([np.asarray(d, dtype="<u2") for d in docs]).tobytes()
    path.write_bytes(head.ljust(HEADER_BYTES, b"\0") + body + offsets.tobytes())


def test_mask_channel_round_trip_and_flag(tmp_path):
    docs, masks = chat_like_docs()
    h = write_shard(tmp_path / "m.bin", docs, VOCAB, "fp", loss_masks=masks)
    shard = open_shard(tmp_path / "m.bin")
    assert h.has_loss_mask and shard.header == h == read_header(tmp_path / "m.bin") and h.version == 2
    assert shard.loss_mask.tolist() == [m for ms in masks for m in ms]
    assert shard.tokens.tolist() == [t for d in docs for t in d]
    assert count_loss_targets(shard) == sum(map(sum, masks))
    # without masks: flag clear, no channel, every token a target
    h2 = write_shard(tmp_path / "n.bin", docs, VOCAB, "fp")
    plain = open_shard(tmp_path / "n.bin")
    assert not h2.has_loss_mask and plain.loss_mask is None and count_loss_targets(plain) == h2.n_tokens
    assert (tmp_path / "m.bin").stat().st_size == (tmp_path / "n.bin").stat().st_size + h.n_tokens
    # a truncated mask is detected like any truncation
    raw = (tmp_path / "m.bin").read_bytes()
    (tmp_path / "t.bin").write_bytes(raw[:-1])
    with pytest.raises(ShardError, match=r"truncated or corrupt shard.*\+ loss mask"):
        open_shard(tmp_path / "t.bin")
    with pytest.raises(ShardError, match="document 1: loss mask of 2 entries for 3 tokens"):
        write_shard(tmp_path / "x.bin", [[1], [1, 2, 3]], VOCAB, "fp", loss_masks=[[1], [0, 1]])
    with pytest.raises(ShardError, match="1 loss masks for 2 documents"):
        write_shard(tmp_path / "x.bin", [[1], [2]], VOCAB, "fp", loss_masks=[[1]])
    bad = bytearray(raw)
    bad[72:76] = struct.pack("<I", 6)
    (tmp_path / "f.bin").write_bytes(bytes(bad))
    with pytest.raises(ShardError, match="unknown header flags 0x6"):
        open_shard(tmp_path / "f.bin")


def test_version_1_shards_stay_readable(tmp_path):
    docs, _ = chat_like_docs()
    write_v1_shard(tmp_path / "old.bin", docs, VOCAB, "fp")
    old = open_shard(tmp_path / "old.bin")
    assert old.header.version == 1 and not old.header.has_loss_mask and old.loss_mask is None
    assert old.tokens.tolist() == [t for d in docs for t in d]
    write_shard(tmp_path / "new.bin", docs, VOCAB, "fp")
    new = open_shard(tmp_path / "new.bin")
    for w in range(3):
        a, b = window_batch(old, np.array([w]), 8), window_batch(new, np.array([w]), 8)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        assert (a.targets != IGNORE_INDEX).all()


def test_loader_ignores_masked_targets_and_keeps_documents(tmp_path):
    docs, masks = chat_like_docs()
    write_shard(tmp_path / "m.bin", docs, VOCAB, "fp", loss_masks=masks)
    flat = [t for d in docs for t in d]
    flat_mask = [m for ms in masks for m in ms]
    owner = [i for i, d in enumerate(docs) for _ in d]
    T = 10
    loader = PackedLoader(tmp_path / "m.bin", T, 2, seed=3)
    for _ in range(4):
        b = loader.next_batch()
        for row in range(2):
            start = int(np.where(np.all(
                np.lib.stride_tricks.sliding_window_view(np.array(flat), T) == b.input_ids[row].numpy(), axis=1))[0][0])
            want = [flat[start + 1 + t] if flat_mask[start + 1 + t] else IGNORE_INDEX for t in range(T)]
            assert b.targets[row].tolist() == want
            # document ids still change exactly where a new conversation starts
            changes = [owner[start + t] != owner[start + t - 1] for t in range(1, T)]
            assert (b.doc_ids[row, 1:] != b.doc_ids[row, :-1]).tolist() == changes
    # one window a batch: the ignored targets never leak into the inputs (they share a row)
    for w in range(5):
        one = window_batch(open_shard(tmp_path / "m.bin"), np.array([w]), T)
        assert one.input_ids.tolist()[0] == flat[w * T:(w + 1) * T]
        assert (one.targets == IGNORE_INDEX).any() or w > 0
    # validation batches carry the mask too; the unigram entropy counts only kept tokens
    for vb in sequential_batches(tmp_path / "m.bin", T, 2, max_batches=1):
        assert (vb.targets == IGNORE_INDEX).any()
    kept = np.array(flat)[np.array(flat_mask) == 1]
    p = np.bincount(kept) / kept.size
    assert unigram_entropy(tmp_path / "m.bin") == pytest.approx(float(-(p[p > 0] * np.log(p[p > 0])).sum()))


def test_a_mask_that_keeps_nothing_stops_before_training(tmp_path):
    docs, masks = chat_like_docs()
    write_shard(tmp_path / "z.bin", docs, VOCAB, "fp", loss_masks=[[0] * len(m) for m in masks])
    write_shard(tmp_path / "ok.bin", docs, VOCAB, "fp", loss_masks=masks)
    problems = data_problems(str(tmp_path / "z.bin"), str(tmp_path / "ok.bin"), VOCAB, 8, 2)
    assert len(problems) == 1 and "data.train_bin" in problems[0] and "keeps no token" in problems[0]


def _masked_batch(tmp_path, B=4, T=16):
    docs, masks = chat_like_docs(40)
    write_shard(tmp_path / "m.bin", docs, VOCAB, "fp", loss_masks=masks)
    return tuple(window_batch(open_shard(tmp_path / "m.bin"), np.arange(B), T))


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_masked_targets_contribute_exactly_zero_gradient(tmp_path):
    model = Transformer(model_config("qwen3_tiny", **TINY))
    batch = _masked_batch(tmp_path)
    ids, targets, doc_ids, positions = batch
    masked = targets == IGNORE_INDEX
    assert masked.any() and (~masked).any()
    n = count_targets(targets)
    # 1) the final hidden state of a masked position gets exactly zero gradient, on both backends
    for backend in ("torch", "triton"):
        h = torch.randn(*targets.shape, 32, requires_grad=True)
        obj = Objective(loss_backend=backend, loss_norm=float(n))
        ce, _, _ = cross_entropy_sums(h, model.logits, model.head_weight, targets, obj)
        ce.backward()
        assert torch.all(h.grad[masked] == 0), backend
        assert torch.all(h.grad[~masked].abs().sum(-1) > 0), backend
    # 2) the model's loss equals a direct sum over the kept targets only, divided by their count
    model.zero_grad()
    loss, _ = lm_loss(model, batch, TrainConfig(), n, backend="torch")
    logits = model(ids, positions=positions, doc_ids=doc_ids).logits.float()
    logp = torch.log_softmax(logits, -1).gather(-1, targets.clamp_min(0)[..., None])[..., 0]
    direct = -(logp * (~masked)).sum() / n
    torch.testing.assert_close(loss, direct)


def test_global_count_normalisation_across_micro_batches(tmp_path):
    """Micro-batches with different numbers of unmasked targets, each divided by the step's global
    count: the summed gradients equal one big batch's (the trainer's optimizer_step does this)."""
    model = Transformer(model_config("qwen3_tiny", **TINY))
    batch = _masked_batch(tmp_path, B=4)
    micro = [tuple(t[sl] for t in batch) for sl in (slice(0, 1), slice(1, 3), slice(3, 4))]
    counts = [count_targets(m[1]) for m in micro]
    assert len(set(counts)) > 1  # a per-micro-batch mean would weigh tokens unequally
    n_global = sum(counts)
    loss, _ = lm_loss(model, batch, TrainConfig(), n_global, backend="torch")
    loss.backward()
    big = grads(model)
    model.zero_grad()
    total = 0.0
    for m in micro:
        lo, _ = lm_loss(model, m, TrainConfig(), n_global, backend="torch")
        lo.backward()
        total += float(lo.detach())
    assert total == pytest.approx(float(loss.detach()), rel=1e-6)
    for name, g in grads(model).items():
        torch.testing.assert_close(g, big[name], rtol=1e-5, atol=1e-7, msg=name)


def test_fused_loss_is_given_only_unmasked_rows(tmp_path, monkeypatch):
    from deepwish.kernels.linear_cross_entropy import triton as tri

    seen = []
    real = tri.linear_cross_entropy

    def spy(h, w, targets, **kw):
        seen.append(targets.clone())
        return real(h, w, targets, **kw)

    monkeypatch.setattr(tri, "linear_cross_entropy", spy)
    model = Transformer(model_config("qwen3_tiny", **TINY))
    batch = _masked_batch(tmp_path, B=2, T=12)
    n = count_targets(batch[1])
    out = {}
    for backend in ("torch", "triton"):
        model.zero_grad()
        loss, _ = lm_loss(model, batch, TrainConfig(), n, backend=backend)
        loss.backward()
        out[backend] = (float(loss.detach()), grads(model))
    assert len(seen) == 1 and seen[0].numel() == n and (seen[0] != IGNORE_INDEX).all()
    assert out["triton"][0] == pytest.approx(out["torch"][0], rel=1e-5)
    for name, g in out["torch"][1].items():
        torch.testing.assert_close(out["triton"][1][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_streaming_writer_writes_the_same_masked_shard(tmp_path):
    from deepwish.data.shards import ShardWriter

    docs, masks = chat_like_docs()
    write_shard(tmp_path / "a.bin", docs, VOCAB, "fp", loss_masks=masks)
    w = ShardWriter(tmp_path / "b.bin", VOCAB, "fp")
    for d, m in zip(docs, masks):
        w.add(d, m)
    w.close()
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
    # documents without a mask are all ones in it; a shard given none has no channel
    w = ShardWriter(tmp_path / "c.bin", VOCAB, "fp")
    w.add(docs[0])
    w.add(docs[1], masks[1])
    w.close()
    assert open_shard(tmp_path / "c.bin").loss_mask.tolist() == [1] * len(docs[0]) + masks[1]
    w = ShardWriter(tmp_path / "d.bin", VOCAB, "fp")
    w.add(docs[0])
    w.close()
    write_shard(tmp_path / "e.bin", docs[:1], VOCAB, "fp")
    assert (tmp_path / "d.bin").read_bytes() == (tmp_path / "e.bin").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.bin", "c.bin", "d.bin", "e.bin"]


def test_streamed_chats_get_the_same_masks_as_built_ones(tmp_path):
    pytest.importorskip("pyarrow")
    from deepwish.data.build import build_shards
    from deepwish.data.mix import Source, build_mix
    from deepwish.data.tokenizer import default_tokenizer

    tok = default_tokenizer()
    for template in ("chatml", "qwen3"):
        a = build_shards(["examples/chat.jsonl"], tmp_path / f"a{template}", tok, val_fraction=0, chat_template=template)
        b = build_mix([Source("examples/chat.jsonl")], tmp_path / f"b{template}", tok, val_fraction=0,
                      chat_template=template, progress=False)
        assert open_shard(b.train_bin).header.has_loss_mask
        assert a.train_bin.read_bytes() == b.train_bin.read_bytes(), template


def test_packed_masked_conversations_equal_the_conversations_run_apart(tmp_path):
    """Document ids keep packed conversations apart: a window's masked loss is the sum of the
    losses of its conversation pieces, each run alone from position 0."""
    model = Transformer(model_config("qwen3_tiny", **TINY)).eval()
    ids, targets, doc_ids, positions = _masked_batch(tmp_path, B=3, T=24)
    with torch.no_grad():
        packed = model(ids, positions=positions, doc_ids=doc_ids, targets=targets)
        apart, n = torch.zeros(()), 0
        for row in range(ids.shape[0]):
            for d in doc_ids[row].unique():
                sel = doc_ids[row] == d
                out = model(ids[row, sel][None], positions=positions[row, sel][None], targets=targets[row, sel][None])
                apart, n = apart + out.ce_sum, n + int(out.n_targets)
    assert doc_ids.max() > 0 and int(packed.n_targets) == n
    torch.testing.assert_close(packed.ce_sum, apart, rtol=1e-5, atol=1e-5)
