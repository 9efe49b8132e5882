"""The sparse MLA bench (deepwish bench dsa --parts kernel), the CPU-checkable parts: the causal
random selection the timings use, and the table / plot of a made-up result."""
import torch

from deepwish.bench import sparse_mla as bench


def test_causal_indices_are_distinct_visible_and_padded():
    idx = bench.causal_indices(2, 6, 9, 5, torch.device("cpu"))
    assert idx.shape == (2, 6, 5) and idx.dtype == torch.int32
    for b in range(2):
        for t in range(6):
            pos = 9 - 6 + t
            row = idx[b, t]
            kept = row[row >= 0]
            assert len(kept) == min(5, pos + 1)                      # -1 only where keys run out
            assert len(set(kept.tolist())) == len(kept)              # distinct
            assert int(kept.max()) <= pos                            # causal
    wide = bench.causal_indices(1, 2, 3, 8, torch.device("cpu"))   # K > S
    assert (wide[0, 1] >= 0).sum() == 3 and (wide[0, 0] >= 0).sum() == 2


def test_tables_and_plot(tmp_path):
    kernel = [dict(name="T4k", T=4096, S=4096, sparse=dict(fwd_ms=1.0, bwd_ms=3.0, fwd_tflops=300.0, bwd_tflops=250.0),
                   dense=dict(fwd_ms=4.0, bwd_ms=12.0, fwd_tflops=100.0, bwd_tflops=80.0)),
              dict(name="T64k", T=65536, S=65536, sparse="error: X", dense="skipped (T > 32768)")]
    decode = [dict(L=8192, T=1, splits=8, sparse_us=20.0, dense_us=40.0),
              dict(L=16384, T=1, splits=8, sparse_us=21.0, dense_us="error: Y")]
    row = bench.fmt_kernel_row(kernel[0])
    assert "| T4k | 4096 | 4096 | 1.00 | 300 | 3.00 | 250 | 4.00 | 12.00 | 100 | 4.0x |" == row
    assert "sparse: error: X" in bench.fmt_kernel_row(kernel[1])
    assert bench.fmt_decode_row(decode[0]) == "| 8192 | 1 | 8 | 20.0 | 40.0 |"
    bench.plot(kernel, decode, tmp_path / "bench.png")
    assert (tmp_path / "bench.png").stat().st_size > 0
