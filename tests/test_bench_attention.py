"""`deepwish bench attention`'s glue for timing the own kernel's backward forms side by side
(the timings themselves need a GPU)."""
import pytest
import torch

from deepwish.bench import attention as ba


def test_backward_forms_become_paths_named_after_the_default():
    assert ba.own_paths([], "kernel") == {"own": "kernel"}
    assert ba.own_paths(["kernel", "atomic"], "kernel") == {"own": "kernel", "own_atomic": "atomic"}
    assert ba.own_paths(["kernel", "atomic"], "atomic") == {"own": "atomic", "own_kernel": "kernel"}
    assert list(ba.own_paths(["kernel", "atomic", "atomic_t"], "kernel")) == ["own", "own_atomic", "own_atomic_t"]


def test_own_form_sets_the_backward_form_the_gradient_takes(monkeypatch):
    """A path's call sets BACKWARD_DQ, and the backward launched from its output uses it."""
    from deepwish.kernels.attention import triton as tk
    from deepwish.kernels.attention.triton import flash_attention
    monkeypatch.setattr(tk, "BACKWARD_DQ", "kernel")
    ran = []
    real = tk.backward_dkdvq
    monkeypatch.setattr(tk, "backward_dkdvq", lambda *a: ran.append("atomic") or real(*a))
    q = torch.randn(1, 5, 2, 16, requires_grad=True)
    k, v = torch.randn(1, 5, 1, 16), torch.randn(1, 5, 1, 16)
    ba.own_form("atomic", flash_attention)(q, k, v).sum().backward()
    assert ran == ["atomic"] and tk.BACKWARD_DQ == "atomic"


def test_the_row_prints_both_forms_beside_flex():
    own = dict(fwd_ms=1.0, bwd_ms=4.0, fwdbwd_ms=5.0, fwd_tflops=1.0)
    atomic = dict(fwd_ms=1.0, bwd_ms=3.0, fwdbwd_ms=4.0, fwd_tflops=1.0)
    flex = dict(fwd_ms=1.0, bwd_ms=3.8, fwdbwd_ms=4.8, fwd_tflops=1.0)
    row = dict(D=128, H=16, Hkv=8, B=1, T=16384, docs=4, window=0, own=own, own_atomic=atomic, flex=flex)
    line = ba.fmt_train_row(row)
    assert "own bwd 4.000 (x1.00 of own) f+b 5.000 /flex x0.96" in line
    assert "own_atomic bwd 3.000 (x1.33 of own) f+b 4.000 /flex x1.20" in line
    assert "backward forms" not in ba.fmt_train_row({k: x for k, x in row.items() if k != "own_atomic"})


def test_unknown_backward_form_is_refused(tmp_path, capsys):
    assert ba.main(["--out", str(tmp_path), "--dq-forms", "kernel,atomics"]) == 2
    assert "--dq-forms" in capsys.readouterr().err


def test_bench_train_times_each_form_with_its_own_backward(monkeypatch, tmp_path):
    """One tiny shape through the training loop (interpreter; a stub in place of do_bench): "own"
    runs the default form, "own_atomic" the atomic one, and the default is back afterwards."""
    from deepwish.kernels.attention import triton as tk
    monkeypatch.setattr(ba, "train_grid", lambda grid: [dict(D=16, H=2, Hkv=1, T=20, B=1, docs=2, window=0)])
    monkeypatch.setattr(ba, "median_ms", lambda fn, grad_to_none=None: (fn(), 1.0)[1])
    monkeypatch.setattr(ba, "graph_ms", lambda fn: (fn(), 0.5)[1])  # rows under GRAPH_BELOW_MS: captured too
    monkeypatch.setattr(tk, "BACKWARD_DQ", "kernel")
    seen = []
    for name in ("backward_dq", "backward_dkdvq"):
        real = getattr(tk, name)
        monkeypatch.setattr(tk, name, lambda *a, _n=name, _f=real: seen.append(_n) or _f(*a))
    rows = ba.bench_train(torch.device("cpu"), "default", {"own"}, tmp_path / "rows.json", ["kernel", "atomic"])
    assert isinstance(rows[0]["own"], dict) and isinstance(rows[0]["own_atomic"], dict)
    assert rows[0]["own"]["fwdbwd_graph_ms"] == 0.5 == rows[0]["own_atomic"]["fwdbwd_graph_ms"]
    assert "backward_dq" in seen and "backward_dkdvq" in seen and tk.BACKWARD_DQ == "kernel"
    assert seen.index("backward_dkdvq") > seen.index("backward_dq")  # own first, then own_atomic


def test_short_rows_print_their_captured_times():
    own = dict(fwd_ms=0.3, bwd_ms=1.0, fwdbwd_ms=1.3, fwd_tflops=1.0, fwdbwd_graph_ms=0.8)
    flex = dict(fwd_ms=0.3, bwd_ms=0.9, fwdbwd_ms=1.2, fwd_tflops=1.0, fwdbwd_graph_ms=1.0)
    row = dict(D=128, H=16, Hkv=8, B=8, T=2048, docs=4, window=0, own=own, flex=flex)
    assert "captured f+b ms own 0.800 flex 1.000 own/flex x1.25" in ba.fmt_train_row(row)
    flex["fwdbwd_graph_ms"] = "error: RuntimeError"  # a path that does not capture keeps its eager figure
    assert "captured f+b ms own 0.800 flex error: RuntimeError own/flex xnan" in ba.fmt_train_row(row)
    del own["fwdbwd_graph_ms"], flex["fwdbwd_graph_ms"]
    assert "captured" not in ba.fmt_train_row(row)
