import torch

from deepwish.kernels.documents import document_ends, document_starts


def test_document_starts_and_ends_match_a_scan_of_the_runs():
    """Against a plain loop over each row: a run of equal ids is one document, even when the same
    id comes back later in the row (then it is a new document)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 3, (4, 37), generator=g)
    ids[1] = 7  # one document spanning the row
    starts, ends = document_starts(ids), document_ends(ids)
    assert starts.dtype == ends.dtype == torch.int64
    for b in range(ids.shape[0]):
        row = ids[b].tolist()
        for t in range(len(row)):
            s = t
            while s > 0 and row[s - 1] == row[t]:
                s -= 1
            e = t + 1
            while e < len(row) and row[e] == row[t]:
                e += 1
            assert (starts[b, t].item(), ends[b, t].item()) == (s, e), (b, t)
    assert starts[1].tolist() == [0] * 37 and ends[1].tolist() == [37] * 37
