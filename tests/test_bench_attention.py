"""`deepwish bench attention`'s glue for timing the own kernel's backward forms side by side
(the timings themselves need a GPU)."""
import pytest
import torch

from deepwish.bench import attention as ba


def test_backward_forms_become_paths_named_after_the_default():
    assert ba.own_paths([], "kernel") == {"own": "kernel"}
    assert ba.own_paths(["kernel", "atomic"], "kernel") == {"own": "kernel", "own_atomic": "atomic"}
    assert ba.own_paths(["kernel", "atomic"], "atomic") == {"own": "atomic", "own_kernel": "kernel"}


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
