"""`deepwish bench kernels` (bench/kernels_conv_lce.py) reporting on the CPU: percentages of the copy
ceiling recorded with the run (the GPU's own, from train/mfu.py), the captured f+b row beside the
eager one."""
import torch

from deepwish.bench import kernels_conv_lce as K


def test_conv_table_uses_the_runs_copy_ceiling_and_shows_the_graph_row(capsys, tmp_path):
    row = {"T": 16384, "ours": {"fwd_ms": 0.1, "fwdbwd_ms": 0.5, "fwd_GBps": 2086.0, "fwdbwd_GBps": 1251.0,
                                "fwdbwd_graph_ms": 0.3, "fwdbwd_graph_GBps": 2503.2}}
    K._print_table({"env": {"copy_GBps_ceiling": 4172.0}, "conv": [row], "lce": []})
    out = capsys.readouterr().out
    assert "copy = 4172 GB/s" in out
    lines = out.splitlines()
    ours = next(x for x in lines if "| ours" in x)
    graph = lines[lines.index(ours) + 1]
    assert ours.split("|")[2].split() == ["0.100", "2086", "50"] and ours.split("|")[3].split() == ["0.500", "1251", "30"]
    assert "as a graph" in graph and graph.split("|")[3].split() == ["0.300", "2503", "60"]
    K._print_table({"conv": [row], "lce": []})  # a results file from before the ceiling was recorded: the H100's
    assert "copy = 2973 GB/s" in capsys.readouterr().out
    K._plot({"env": {"copy_GBps_ceiling": 4172.0}, "conv": [row]}, str(tmp_path))
    assert (tmp_path / "conv.png").stat().st_size > 1000


def test_ceilings_are_the_devices_measured_ones(monkeypatch):
    from deepwish.bench.env import ceilings, copy_bw
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, want in (("NVIDIA H200", 4172.0), ("NVIDIA H100 80GB HBM3", 2973.0), ("NVIDIA A100-SXM4-80GB", 2973.0)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, n=name: n)
        assert copy_bw() / 1e9 == want, name  # a GPU without a measured copy falls back to the H100's
    assert ceilings() == (312e12, 2973e9)  # the A100: its datasheet matmul peak, the H100's copy


def test_gdn_tables_use_the_devices_peaks(capsys, monkeypatch, tmp_path):
    from deepwish.bench import gdn
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    from deepwish.bench.env import ceilings
    flops, copy = ceilings()
    peaks = flops / 1e12, copy / 1e9
    assert peaks == (774.0, 4172.0)
    T = 4096
    ms = gdn.gdn_fwd_flops(T) / 387e12 * 1e3  # half of 774 TFLOP/s
    chunk = {"triton fwd": {T: ms}}
    decode = {"triton decode": {1: gdn.decode_bytes(1) / 2086e9 * 1e3}}  # half of 4172 GB/s
    gdn.print_table(chunk, decode, (T,), *peaks)
    out = capsys.readouterr().out
    assert "% of 774)" in out and "% of 4172 copy" in out
    assert "387, 50%)" in out and "2086, 50%)" in out
    gdn.plot(chunk, decode, (T,), str(tmp_path / "gdn.png"), 4172.0)
    assert (tmp_path / "gdn.png").stat().st_size > 1000


def test_gdn_bench_profiles_our_forward_and_backward(monkeypatch, capsys):
    """`bench gdn --profile-T` lists every backend's forward kernels and ours forward + backward (the
    backward's kernels are the rest): here on CPU through the interpreter, small heads, the profiler
    stubbed by a timer that runs the step once and names what ran."""
    from deepwish.bench import gdn
    from deepwish.kernels.gated_delta import chunk_gated_delta_rule
    monkeypatch.setattr(gdn, "H", 1)
    monkeypatch.setattr(gdn, "D", 16)
    ran = []

    def fake_times(step, rows=12):
        step()
        return {"kernels": [{"name": "k", "us_per_step": 1.0, "calls_per_step": 1}], "sum_ms": 1e-3}

    def ours(*x):
        ran.append("fwd")
        o = chunk_gated_delta_rule(*x)[0]
        if o.requires_grad:
            o.register_hook(lambda grad: ran.append("bwd"))
        return o

    backends = {"triton": {"chunk": ours}, "fla": {"chunk": lambda *x: ran.append("fla")}}
    monkeypatch.setattr(gdn, "kernel_times", fake_times)
    out = gdn.profile_forward(backends, 70, "cpu")
    assert set(out) == {"triton", "triton fwd+bwd", "fla"}
    assert ran == ["fwd", "fwd", "bwd", "fla"]
    printed = capsys.readouterr().out
    assert "triton fwd at T=70" in printed and "triton fwd+bwd at T=70" in printed and "fla fwd at T=70" in printed


def test_gdn_bench_times_ours_against_another_version_of_the_kernels(monkeypatch, capsys, tmp_path):
    """`bench gdn --against FILE` loads another version of kernels/gated_delta/triton.py beside ours and
    times both forward and forward + backward, alternating (here on CPU through the interpreter, small
    heads, the timer stubbed to record the order; the other version is a copy of ours whose forward
    returns twice the output, so which version ran shows); a missing file is a clear error."""
    import pytest

    from deepwish.bench import gdn
    from deepwish.kernels.gated_delta import triton as ours
    monkeypatch.setattr(gdn, "H", 1)
    monkeypatch.setattr(gdn, "D", 16)
    other = tmp_path / "old_triton.py"
    text = open(ours.__file__).read()
    assert "    return o, ht, (G, Ai, w, h, v_new)" in text
    other.write_text(text.replace("    return o, ht, (G, Ai, w, h, v_new)", "    return 2 * o, ht, (G, Ai, w, h, v_new)"))
    calls = []
    monkeypatch.setattr(gdn, "median_ms", lambda fn: (calls.append(fn()), 1.0)[1])
    out = gdn.compare_with_file(str(other), [70], "cpu", rounds=2)
    (row,) = out["rows"]
    assert row["T"] == 70 and len(row["rel_diff"]) == 6 and 0.45 < row["rel_diff"][0] < 0.55  # o: 2x against 1x
    assert row["fwd_ms"] == row["fwd_bwd_ms"] == {"other": [1.0, 1.0], "ours": [1.0, 1.0]}
    outs = [c if isinstance(c, torch.Tensor) else c[0] for c in calls]
    assert [isinstance(c, torch.Tensor) for c in calls] == [True, False] * 4        # fwd, fwd+bwd
    for i in (0, 1, 4, 5):                                                           # other, then ours
        assert torch.allclose(outs[i], 2 * outs[i + 2])
    assert "T=70 against" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="no kernel file"):
        gdn.compare_with_file(str(tmp_path / "missing.py"), [70], "cpu")
