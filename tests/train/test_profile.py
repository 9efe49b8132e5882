"""train.profile_steps: torch.profiler over steps of the real loop, the GPU's idle time by host
phase (train/profile.py)."""
import gzip
import json

import pytest

from deepwish.config import ConfigError, load_config, validate
from deepwish.train import loop
from deepwish.train.profile import gaps, host_stacks, idle_by_phase, summary_lines, trace_figures, union

from tests.train.test_loop import TINY


def test_union_and_gaps():
    assert union([(5, 7), (0, 2), (1, 3), (7, 8)]) == [(0, 3), (5, 8)]
    assert gaps([(0, 3), (5, 8)], (0, 10)) == [(3, 5), (8, 10)]
    assert gaps([(-2, 1), (12, 14)], (0, 10)) == [(1, 10)]
    assert gaps([], (2, 4)) == [(2, 4)]


def test_idle_time_goes_to_the_host_phase_running_meanwhile():
    busy = [(0, 10), (4, 12), (20, 30)]  # overlapping streams count once: busy 0-12 and 20-30
    phases = [("forward_backward", 0, 9), ("read", 9, 14), ("optimizer", 14, 22)]
    # idle: 12-20 (read 12-14, optimizer 14-20) and 30-35 (no phase)
    assert idle_by_phase(busy, phases, (0, 35)) == {"read": 2, "optimizer": 6, "other": 5}


def _event(cat, name, ts, dur):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}


def test_trace_figures_and_summary_from_a_kineto_trace():
    trace = {"traceEvents": [
        _event("user_annotation", "deepwish.forward_backward", 100, 50),
        _event("user_annotation", "deepwish.read", 150, 30),
        _event("user_annotation", "deepwish.optimizer", 180, 20),
        _event("user_annotation", "Optimizer.step#AdamW.step", 181, 10),  # not a phase
        _event("gpu_user_annotation", "deepwish.read", 150, 30),  # the device-side copy: not a phase
        _event("cpu_op", "aten::mm", 101, 5),
        _event("kernel", "gemm", 110, 60), _event("gpu_memcpy", "copy", 165, 10),
        _event("kernel", "adam", 190, 30),
    ]}
    fig = trace_figures(trace)
    # window 100..220; busy 110-175 and 190-220 = 95; idle 100-110 (forward_backward), 175-180 (read),
    # 180-190 (optimizer)
    assert fig["wall_us"] == 120 and fig["busy_us"] == 95 and fig["device_events"] == 3
    assert fig["idle_us"] == {"forward_backward": 10, "read": 5, "optimizer": 10}
    assert fig["host_us"] == {"forward_backward": 50, "read": 30, "optimizer": 20}
    lines = summary_lines(fig, 3, 3)
    assert "GPU busy 0.1 ms a step (79%)" in lines[0] and "optimizer 0.01" in lines[1]
    with pytest.raises(ValueError, match="no deepwish"):
        trace_figures({"traceEvents": [_event("kernel", "gemm", 0, 1)]})


def test_host_stacks_name_the_nested_events_covering_each_time():
    host = [("deepwish.fb", 0, 100), ("a", 10, 40), ("b", 20, 30), ("c", 50, 60)]
    assert host_stacks(host, [5, 25, 35, 45, 55, 100]) == [
        ("deepwish.fb",), ("deepwish.fb", "a", "b"), ("deepwish.fb", "a"), ("deepwish.fb",), ("deepwish.fb", "c"), ()]


def test_idle_gaps_and_blocking_calls_go_to_the_host_events_behind_them():
    trace = {"traceEvents": [
        _event("user_annotation", "deepwish.forward_backward", 0, 100),
        _event("user_annotation", "deepwish.read", 100, 20),
        _event("cpu_op", "attention", 10, 30), _event("cpu_op", "aten::empty", 12, 2),
        _event("cpu_op", "aten::item", 102, 15),
        {**_event("cuda_runtime", "cudaStreamSynchronize", 103, 12)},
        {**_event("cuda_runtime", "cudaLaunchKernel", 20, 1)},  # not blocking
        _event("kernel", "k1", 0, 11), _event("kernel", "k2", 30, 60), _event("kernel", "k3", 95, 10),
        # the autograd engine's thread (it runs the backward on CUDA): deeper than the loop's at 90
        {**_event("cpu_op", "evaluate_function: MmBackward0", 85, 10), "tid": 7},
        {**_event("cpu_op", "aten::add_", 88, 5), "tid": 7},
    ]}
    fig = trace_figures(trace)
    # idle 11-30 (the loop inside attention, aten::empty having ended), 90-95 (the loop inside no
    # event, the autograd thread inside an add), 105-120
    assert fig["idle_at"] == {"forward_backward: attention": [1, 19.0],
                              "forward_backward: evaluate_function: MmBackward0 > aten::add_": [1, 5.0],
                              "read: aten::item": [1, 15.0]}
    assert fig["blocking"] == {"cudaStreamSynchronize in read: aten::item": [1, 12.0]}
    assert fig["short_gaps"] == (1, 5.0) and fig["long_gaps"] == (2, 34.0)  # 90-95; 11-30 and 105-120
    lines = summary_lines(fig, 1, 1)
    assert any("0.02 (1)  forward_backward: attention" in line for line in lines)
    assert any("cudaStreamSynchronize in read: aten::item" in line for line in lines)


def test_a_profiled_run_writes_its_summary_and_trace(tmp_path, capsys):
    cfg = load_config("qwen3_tiny", TINY + [f"train.out_dir={tmp_path}", "train.steps=4", "train.profile_start=1",
                                            "train.profile_steps=2", "train.sample_tokens=0", "train.eval_every=2"])
    loop.train(cfg, progress_bar=False)
    summary = (tmp_path / "profile" / "summary.txt").read_text()
    assert summary.startswith("profile: steps 2-3: wall ") and "no GPU work in the trace (a CPU run)" in summary
    for name in ("data", "forward_backward", "clip", "read", "optimizer", "log", "evaluate"):
        assert f"{name} " in summary.splitlines()[1], name
    names = {e.get("name") for e in json.loads(gzip.open(tmp_path / "profile" / "trace.json.gz").read())["traceEvents"]}
    assert {"deepwish.forward_backward", "deepwish.optimizer"} <= names
    assert "profile: steps 2-3" in capsys.readouterr().out


def test_a_profile_window_outside_the_run_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="train.profile_steps=3: steps 3-5 are not all in the run's 4 steps"):
        validate(load_config("qwen3_tiny", TINY + [f"train.out_dir={tmp_path}", "train.steps=4",
                                                   "train.profile_start=2", "train.profile_steps=3"]))
