import random

import numpy as np
import pytest
import torch

from deepwish.data.loader import Lookahead, PackedLoader, sequential_batches, unigram_entropy
from deepwish.data.shards import write_shard

VOCAB = 500


def make_shard(path, n_docs=40, max_len=90, empty_docs=True, seed=0):
    """Random documents (seeded: every run sees the same shard), each at most `max_len` tokens
    including its eos."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        doc = [rng.randrange(1, VOCAB) for _ in range(rng.randrange(0 if empty_docs else 1, max_len))]
        docs.append(doc + [0])  # eos = 0
    if empty_docs:
        docs.insert(5, [])  # a zero-length document must not break numbering
    write_shard(path, docs, VOCAB, "fp")
    return docs


def reference_rows(docs, start, seq_len):
    """Brute force: (input, target, doc_id, position) of the window starting at token `start`."""
    flat, owner, offset = [], [], []
    for d, doc in enumerate(docs):
        for i, t in enumerate(doc):
            flat.append(t)
            owner.append(d)
            offset.append(i)
    inputs = flat[start : start + seq_len]
    targets = flat[start + 1 : start + seq_len + 1]
    doc_ids, positions = [], []
    current, local = owner[start], 0
    for t in range(seq_len):
        j = start + t
        if owner[j] != current:
            current, local = owner[j], local + 1
        doc_ids.append(local)
        # the document the window starts in counts from the window start
        positions.append(offset[j] if local > 0 else offset[j] - offset[start])
    return inputs, targets, doc_ids, positions


def test_batches_match_brute_force(tmp_path):
    seq_len, batch_size = 37, 3
    # documents shorter than a window: every window holds a document change (asserted below)
    docs = make_shard(tmp_path / "s.bin", max_len=seq_len - 1)
    loader = PackedLoader(tmp_path / "s.bin", seq_len, batch_size, seed=5)
    order = loader._epoch_order(0)
    for step in range(4):
        batch = next(loader)
        assert batch.input_ids.dtype == batch.targets.dtype == batch.positions.dtype == torch.int64
        assert batch.doc_ids.dtype == torch.int32 and batch.input_ids.shape == (batch_size, seq_len)
        assert torch.equal(batch.input_ids[:, 1:], batch.targets[:, :-1])  # targets are the shift
        for b in range(batch_size):
            window = int(order[step * batch_size + b])
            inputs, targets, doc_ids, positions = reference_rows(docs, window * seq_len, seq_len)
            assert batch.input_ids[b].tolist() == inputs
            assert batch.targets[b].tolist() == targets
            assert batch.doc_ids[b].tolist() == doc_ids
            assert batch.positions[b].tolist() == positions
        # at every document change the previous document's last input is its eos, whose
        # target (the next document's first token) is kept: no masking at boundaries
        change = batch.doc_ids[:, 1:] != batch.doc_ids[:, :-1]
        assert change.any(dim=1).all()
        assert (batch.input_ids[:, :-1][change] == 0).all() and (batch.positions[:, 1:][change] == 0).all()
        assert torch.equal(batch.targets[:, :-1][change], batch.input_ids[:, 1:][change])


def test_epoch_covers_all_windows_once_and_reshuffles(tmp_path):
    make_shard(tmp_path / "s.bin", empty_docs=False)
    loader = PackedLoader(tmp_path / "s.bin", 16, 4, seed=3)
    first = [next(loader).input_ids for _ in range(loader.steps_per_epoch)]
    assert loader.epoch == 1 and loader.step == 0
    second = [next(loader).input_ids for _ in range(loader.steps_per_epoch)]
    assert not all(torch.equal(a, b) for a, b in zip(first, second))
    # without shuffling, windows come in order and every token but the first is a target once
    plain = PackedLoader(tmp_path / "s.bin", 16, 4, shuffle=False)
    tokens = plain.shard.tokens
    seen = torch.cat([next(plain).targets.flatten() for _ in range(plain.steps_per_epoch)])
    used = plain.steps_per_epoch * 4 * 16
    assert seen.tolist() == tokens[1 : used + 1].tolist()


def test_ranks_never_share_windows(tmp_path):
    make_shard(tmp_path / "s.bin", n_docs=80)
    world = 3
    loaders = [PackedLoader(tmp_path / "s.bin", 20, 2, rank=r, world_size=world, seed=7) for r in range(world)]
    steps = loaders[0].steps_per_epoch
    assert all(L.steps_per_epoch == steps for L in loaders)
    starts = []
    for L in loaders:
        for _ in range(steps):
            batch = next(L)
            # windows are told apart by content (random ids: collisions are negligible)
            starts += [tuple(row.tolist()) for row in batch.input_ids]
    assert len(starts) == len(set(starts)) == steps * world * 2


def test_resume_gives_identical_batches(tmp_path):
    make_shard(tmp_path / "s.bin")
    a = PackedLoader(tmp_path / "s.bin", 24, 2, seed=11)
    for _ in range(a.steps_per_epoch + 3):  # cross an epoch boundary first
        next(a)
    state = a.state_dict()
    expected = [next(a) for _ in range(a.steps_per_epoch)]
    b = PackedLoader(tmp_path / "s.bin", 24, 2, seed=11)
    b.load_state_dict(state)
    for want in expected:
        got = next(b)
        assert all(torch.equal(x, y) for x, y in zip(want, got))
    c = PackedLoader(tmp_path / "s.bin", 24, 3, seed=11)
    with pytest.raises(ValueError, match="batch_size is 2 in the checkpoint, 3 here"):
        c.load_state_dict(state)


def test_lookahead_holds_the_next_batches_and_checkpoints_the_position_before_them(tmp_path):
    make_shard(tmp_path / "s.bin")
    plain = PackedLoader(tmp_path / "s.bin", 24, 2, seed=11)
    want = [next(plain) for _ in range(5)]
    ahead = Lookahead(PackedLoader(tmp_path / "s.bin", 24, 2, seed=11))
    assert ahead.batch_size == 2 and ahead.steps_per_epoch == plain.steps_per_epoch  # the loader's own
    got = ahead.take(2)
    before = ahead.state_dict()
    ahead.ahead(3)
    assert ahead.state_dict() == before != ahead.loader.state_dict()  # a checkpoint now resumes at the held batches
    with pytest.raises(ValueError, match="already held"):
        ahead.ahead(1)
    with pytest.raises(ValueError, match="3 batches were drawn ahead, 2 are taken"):
        ahead.take(2)
    got += ahead.take(3)  # still held after the refused take
    assert all(torch.equal(x, y) for w, g in zip(want, got) for x, y in zip(w, g))
    assert ahead.state_dict() == plain.state_dict()
    resumed = Lookahead(PackedLoader(tmp_path / "s.bin", 24, 2, seed=11))
    resumed.ahead(1)
    resumed.load_state_dict(before)  # drops what it held
    assert all(torch.equal(x, y) for w, g in zip(want[2:], resumed.take(3)) for x, y in zip(w, g))


def test_bad_arguments(tmp_path):
    make_shard(tmp_path / "s.bin", n_docs=2, max_len=5, empty_docs=False)
    with pytest.raises(ValueError, match="one step needs world_size\\*batch_size"):
        PackedLoader(tmp_path / "s.bin", 64, 4)
    with pytest.raises(ValueError, match="rank 2 outside"):
        PackedLoader(tmp_path / "s.bin", 2, 1, rank=2, world_size=2)


def test_sequential_batches(tmp_path):
    docs = make_shard(tmp_path / "s.bin")
    flat = [t for d in docs for t in d]
    batches = list(sequential_batches(tmp_path / "s.bin", 10, 4))
    assert len(batches) == ((len(flat) - 1) // 10) // 4
    assert batches[0].input_ids.flatten().tolist() == flat[:40]
    assert batches[1].targets[0].tolist() == flat[41:51]
    assert len(list(sequential_batches(tmp_path / "s.bin", 10, 4, max_batches=2))) == 2
    # split over two ranks: alternating batches, same count on each
    r0 = list(sequential_batches(tmp_path / "s.bin", 10, 4, max_batches=5, rank=0, world_size=2))
    r1 = list(sequential_batches(tmp_path / "s.bin", 10, 4, max_batches=5, rank=1, world_size=2))
    assert len(r0) == len(r1) == 2 and torch.equal(r1[0].input_ids, batches[1].input_ids)


def test_unigram_entropy(tmp_path):
    docs = make_shard(tmp_path / "s.bin")
    counts = np.bincount([t for d in docs for t in d]).astype(float)
    p = counts[counts > 0] / counts.sum()
    assert unigram_entropy(tmp_path / "s.bin") == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-12)
    write_shard(tmp_path / "u.bin", [[1, 2, 3, 4] * 50], 8, "fp")
    assert unigram_entropy(tmp_path / "u.bin") == pytest.approx(np.log(4))
