"""The kernel sweep at toy scales on CPU (Triton under the interpreter, conftest) and the decode
throughput-vs-latency chart's drawing."""
import json

import pytest

from deepwish.bench import sweep
from deepwish.bench.decode import Row, plot_tradeoff


def test_sweep_quick_times_checks_and_draws(tmp_path, capsys):
    res = sweep.run(tmp_path, scales=sweep.QUICK_SCALES, device="cpu")
    assert res["scales"] == [[1, 16, 16], [2, 32, 16]]
    for kernel in sweep.KERNELS:
        for backend in ("torch", "triton"):
            ms = res["ms"][f"{kernel} {backend}"]
            assert len(ms) == 2 and all(isinstance(v, float) and v > 0 for v in ms), (kernel, backend, ms)
        # triton agrees with the reference at the first scale (fp32 on CPU)
        assert res["check_rel_rms"][f"{kernel} triton"] < 1e-4
        sp = res["speedup"][f"{kernel} triton/torch"]
        ms_t, ms_r = res["ms"][f"{kernel} triton"], res["ms"][f"{kernel} torch"]
        assert sp["per_scale"] == pytest.approx([r / t for r, t in zip(ms_r, ms_t)])
    # throughput: tokens per call over the time (B·T for conv and chunk, B for one step)
    assert res["tok_s"]["short_conv torch"][1] == pytest.approx(2 * 32 / (res["ms"]["short_conv torch"][1] * 1e-3))
    assert res["tok_s"]["recurrent_step torch"][1] == pytest.approx(2 / (res["ms"]["recurrent_step torch"][1] * 1e-3))
    assert json.loads((tmp_path / "results.json").read_text())["ms"] == res["ms"]
    assert (tmp_path / "sweep_time.png").stat().st_size > 10_000 and (tmp_path / "sweep_speedup.png").is_file()
    assert "== kernel sweep" in capsys.readouterr().out
    # a run stopped during the second scale: redrawn from what it saved
    part = json.loads((tmp_path / "results.json").read_text())
    for key in ("recurrent_step torch", "recurrent_step triton"):
        part["ms"][key], part["tok_s"][key] = part["ms"][key][:1], part["tok_s"][key][:1]
    (tmp_path / "results.json").write_text(json.dumps(part))
    (tmp_path / "sweep_speedup.png").unlink()
    again = sweep.replot(tmp_path)
    assert again["speedup"]["recurrent_step triton/torch"]["per_scale"] == res["speedup"][
        "recurrent_step triton/torch"]["per_scale"][:1]
    assert (tmp_path / "sweep_speedup.png").is_file()


def test_sweep_time_limit_stops_between_scales(tmp_path):
    res = sweep.run(tmp_path, scales=((1, 16, 16), (1, 16, 32)), kernels=("short_conv",), device="cpu",
                    time_limit_s=0.0)
    assert len(res["ms"]["short_conv torch"]) == 1 and "stopped after 1 of 2 scales" in res["notes"][0]
    assert (tmp_path / "sweep_time.png").is_file()


def test_sweep_scales_and_heads():
    assert sweep.SCALES[0] == (2, 256, 128) and sweep.SCALES[-1] == (64, 2048, 4096) and len(sweep.SCALES) == 10
    assert sweep.heads(4096) == (32, 128) and sweep.heads(64) == (1, 64)
    assert sweep.parse_scales("2x256x128,8X1024x1024") == ((2, 256, 128), (8, 1024, 1024))
    with pytest.raises(ValueError, match="not a multiple"):
        sweep.parse_scales("2x256x192")
    with pytest.raises(ValueError, match="BxTxD"):
        sweep.parse_scales("2x256")


def test_tradeoff_plot(tmp_path):
    rows = [Row("p", "graph", b, 512, ms_per_step=0.5 + 0.01 * b, tok_s=b * 1e3 / (0.5 + 0.01 * b))
            for b in (1, 8, 64, 256)] + [Row("p", "graph", 512, 512, note="skipped")]
    plot_tradeoff(rows, tmp_path / "t.png", 512)
    assert (tmp_path / "t.png").stat().st_size > 10_000


@pytest.mark.gpu
def test_sweep_first_scale_on_gpu(tmp_path, cuda):
    res = sweep.run(tmp_path, scales=sweep.SCALES[:1], device="cuda")
    for kernel in sweep.KERNELS:
        assert res["check_rel_rms"][f"{kernel} triton"] < 2e-2  # bf16 inputs against the fp32 reference
        assert isinstance(res["ms"][f"{kernel} triton"][0], float)
