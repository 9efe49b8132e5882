"""bench decode_tiles on the CPU (the kernels under the interpreter, wall time for the graph timer):
every candidate is checked and timed as a row, and the shipped configuration comes back afterwards."""
import math
import time
from unittest import mock

import torch

import deepwish.bench.decode_tiles as dt
from deepwish.config import model_config
from deepwish.kernels.attention import decode as dk
from deepwish.kernels.gemv import triton as gk


def _wall_ms(fn, *args, **kw):
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def test_sweeps_time_every_candidate_and_restore_the_shipped_configuration():
    cfg = model_config("qwen3_tiny", n_layers=2, vocab_size=64, d_model=32, d_ff=48, n_heads=2, n_kv_heads=1,
                       head_dim=16)
    shipped = (list(gk._one_row_kernel.configs), gk.PREFETCH_UNDER_PDL, dk.DECODE_PROGRAMS_PER_SM,
               dk.DECODE_CHUNK_UNIT, dk.DECODE_BN)
    rows = []
    with mock.patch.object(dt, "graph_ms", _wall_ms), mock.patch.object(dt, "copy_bw", lambda: 1e9), \
            mock.patch.object(dt, "GEMV_CANDIDATES", [(4, 16, 1, 1), (2, 32, 1, 1)]), \
            mock.patch.object(dt, "SPLIT_PER_SM", (1, 4)), mock.patch.object(dt, "SPLIT_UNITS", (16,)), \
            mock.patch.object(dt, "SPLIT_TILES", [(16, 1, 1)]):
        dt.sweep_gemv(cfg, 2, torch.device("cpu"), "auto", rows)
        dt.sweep_split(cfg, 2, 40, torch.device("cpu"), "auto", rows)
    gemv = [r for r in rows if r["kernel"] == "gemv"]
    split = [r for r in rows if r["kernel"] == "split"]
    # 4 projections and the LM head, each shipped, shipped without the prefetch, autotuned alone, 2 candidates
    assert len(gemv) == 5 * 5 and len(split) == 1 + 1 + 2
    assert {r["case"] for r in gemv} == {"qkv+norm", "o+residual", "gate_up+norm+swiglu", "down+residual", "lm_head"}
    for r in rows:
        assert r["us"] > 0 and (isinstance(r["config"], str) or r["rel_rms"] < 1e-2), r
    assert split[1]["rel_rms"] == 0.0 and "prefetch" in split[1]["config"]  # no PDL off the GPU: the same kernel
    assert [r["splits"] for r in split[2:]] != [split[2]["splits"]] * 2  # per_sm changes the split count
    assert not any(math.isnan(r["us"]) for r in rows)
    assert shipped == (list(gk._one_row_kernel.configs), gk.PREFETCH_UNDER_PDL, dk.DECODE_PROGRAMS_PER_SM,
                       dk.DECODE_CHUNK_UNIT, dk.DECODE_BN)
    assert gk.USE_IN_STEP_TILES


def test_step_part_times_the_shipped_step_and_each_change_undone():
    """`step` times the model's step as shipped, with the split kernel's prefetch switched and with
    the GEMV's tiles autotuned alone, re-picked each time (the autotuner's cache emptied), and leaves
    the shipped settings on."""
    from deepwish.bench.decode import Row
    seen = []

    def fake_rows(preset, model, batch, context, new_tokens, modes, device, label=None):
        seen.append(((gk.USE_IN_STEP_TILES, dk.PREFETCH_UNDER_PDL),
                     gk._one_row_kernel.cache == {}, modes, label))
        return [Row(preset, label, batch, context, ms_per_step=1.0 if gk.USE_IN_STEP_TILES else 1.25,
                    weight_gb=1.0, cache_gb=0.5)]
    rows = []
    gk._one_row_kernel.cache = {("stale",): None}
    with mock.patch("deepwish.bench.decode._decode_rows", fake_rows), \
            mock.patch("deepwish.bench.decode.build", lambda cfg, dev: None):
        dt.sweep_step("qwen3_tiny", 40, torch.device("cpu"), rows, mode="compiled")
    p = dk.PREFETCH_UNDER_PDL  # as shipped, then each switched
    assert [x[:3] for x in seen] == [((True, p), True, ["compiled"]), ((True, not p), True, ["compiled"]),
                                     ((False, p), True, ["compiled"])]
    assert [r["us"] for r in rows] == [1000.0, 1000.0, 1250.0] and rows[0]["bytes"] == 1.5e9
    assert (gk.USE_IN_STEP_TILES, dk.PREFETCH_UNDER_PDL) == (True, p)
    assert gk._one_row_kernel.cache == {}


def test_step_part_at_a_larger_batch_times_the_other_matmul():
    """Above batch 1 the step part times the step as shipped and, where the rows kernel serves the
    batch, its other operand form and cuBLAS instead; where it does not (compiled, above
    MAX_ROWS), the rows kernel instead of cuBLAS; the limits and the form come back."""
    from deepwish.bench.decode import Row
    from deepwish.kernels import gemv as gd
    seen = []

    def fake_rows(preset, model, batch, context, new_tokens, modes, device, label=None):
        seen.append((batch, modes[0], gd.MAX_ROWS_CAPTURED, gd.MAX_ROWS, gk.ROWS_DOT, gk.ROWS_SPLIT_K,
                     gk.ROWS_NORM_ROW_SUMS))
        return [Row(preset, label, batch, context, ms_per_step=1.0, weight_gb=1.0, cache_gb=0.5)]
    shipped = (gd.MAX_ROWS_CAPTURED, gd.MAX_ROWS, gk.ROWS_DOT, gk.ROWS_SPLIT_K, gk.ROWS_NORM_ROW_SUMS)
    assert shipped[3:] == (False, False)  # both opt-in: the variants below switch them on
    assert shipped[0] >= 64 > shipped[1]  # the case below: 64 rows served captured, not compiled
    other = "native" if gk.ROWS_DOT == "tf32" else "tf32"
    rows = []
    with mock.patch("deepwish.bench.decode._decode_rows", fake_rows), \
            mock.patch("deepwish.bench.decode.build", lambda cfg, dev: None):
        dt.sweep_step("qwen3_tiny", 40, torch.device("cpu"), rows, batch=64)
        dt.sweep_step("qwen3_tiny", 40, torch.device("cpu"), rows, batch=64, mode="compiled")
    dot = shipped[2]
    assert seen == [(64, "graph", *shipped), (64, "graph", *shipped[:2], other, False, False),
                    (64, "graph", *shipped[:3], True, False), (64, "graph", *shipped[:3], False, True),
                    (64, "graph", *shipped[:3], True, True), (64, "graph", 0, 0, dot, False, False),
                    (64, "compiled", *shipped), (64, "compiled", 64, 64, dot, False, False),
                    (64, "compiled", 64, 64, dot, True, True)]
    assert [r["case"] for r in rows] == ["batch 64, context 40, graph"] * 6 + ["batch 64, context 40, compiled"] * 3
    assert (gd.MAX_ROWS_CAPTURED, gd.MAX_ROWS, gk.ROWS_DOT, gk.ROWS_SPLIT_K, gk.ROWS_NORM_ROW_SUMS) == shipped


def test_rows_part_times_cublas_and_both_forms_fused_and_plain():
    """`rows`: per batch and projection, cuBLAS and the rows kernel in both operand forms and with K
    split, with its fusions and without them; the plain kernel's output checked against cuBLAS's."""
    cfg = model_config("qwen3_tiny", n_layers=2, vocab_size=64, d_model=32, d_ff=48, n_heads=2, n_kv_heads=1,
                       head_dim=16)
    shipped = (gk.ROWS_DOT, gk.ROWS_SPLIT_K, gk.ROWS_NORM_ROW_SUMS)
    rows = []
    with mock.patch.object(dt, "graph_ms", _wall_ms), mock.patch.object(dt, "copy_bw", lambda: 1e9):
        # fp16: the interpreter's bf16 dot is not exact
        dt.sweep_rows(cfg, 2, torch.device("cpu"), "auto", rows, counts=(3, 40), dtype=torch.float16)
    # per row count: cuBLAS, 3 forms fused and plain, and the 2 row-sum forms fused where the norm is (2 of 5)
    assert len(rows) == 2 * (5 * 7 + 2 * 2)
    assert sum("row sums" in r["config"] for r in rows) == 2 * 2 * 2
    assert {r["case"].split(",")[0] for r in rows if "row sums" in r["config"]} == {"qkv+norm", "gate_up+norm+swiglu"}
    assert {r["case"] for r in rows} >= {"gate_up+norm+swiglu, 40 rows", "lm_head, 3 rows"}
    for r in rows:
        assert r["us"] > 0, r
        if "plain" in r["config"]:  # the kernel computes cuBLAS's product, within fp16's rounding
            assert r["rel_rms"] < 2e-3 and r["picked"] is not None, r
    assert (gk.ROWS_DOT, gk.ROWS_SPLIT_K, gk.ROWS_NORM_ROW_SUMS) == shipped


def test_main_sweeps_the_split_kernel_at_each_context(tmp_path):
    """--context takes a list: the split part sweeps each (the step part, the first)."""
    seen = []
    with mock.patch.object(dt, "sweep_split", lambda cfg, layers, c, dev, pdl, rows: seen.append(c)), \
            mock.patch.object(dt, "sweep_step",
                              lambda preset, c, dev, rows, mode, batch: seen.append(("step", c, mode, batch))), \
            mock.patch.object(dt, "bench_environment", lambda *a, **k: dict(k)), \
            mock.patch("torch.cuda.is_available", lambda: True), mock.patch("torch.cuda.get_device_name", lambda: "-"), \
            mock.patch("deepwish.kernels.pdl.use_pdl", lambda *a: False):
        assert dt.main(["--out", str(tmp_path), "--preset", "qwen3_tiny", "--parts", "split,step",
                        "--context", "512,4096", "--batch", "1,64"]) == 0
    assert seen == [512, 4096, ("step", 512, "graph", 1), ("step", 512, "graph", 64)]
    assert (tmp_path / "decode_tiles.json").exists()


def test_switched_sets_and_restores_even_on_error():
    """The bench's switches come back as they were, also when a timed call fails; a kernel's
    autotuning cache comes back as the same dict (the shipped picks, not re-tuned)."""
    import types
    obj = types.SimpleNamespace(flag=True, cache={"key": "pick"})
    before = obj.cache
    try:
        with dt.switched(obj, flag=False, cache={}):
            assert obj.flag is False and obj.cache == {}
            raise RuntimeError("a failing candidate")
    except RuntimeError:
        pass
    assert obj.flag is True and obj.cache is before
