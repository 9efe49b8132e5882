"""bench decode_profile: the per-kernel table's arithmetic, and the tool end to end on the CPU."""
import json

import pytest

from deepwish.bench.decode_profile import class_summary, kernel_class, kernel_table, run


def test_kernel_table_sums_per_step():
    events = [("nvjet_hsh_gemv", 4.0), ("triton_red_fused_rms", 2.0), ("nvjet_hsh_gemv", 6.0),
              ("_split_kernel", 3.0), ("triton_red_fused_rms", 2.0), ("nvjet_hsh_gemv", 10.0)]
    rows = kernel_table(events, steps=2, step_us=20.0)
    assert [r.name for r in rows] == ["nvjet_hsh_gemv", "triton_red_fused_rms", "_split_kernel"]
    g = rows[0]
    assert (g.calls_per_step, g.us_per_step, g.pct_of_step, g.cls) == (1.5, 10.0, 50.0, "gemm")
    assert rows[1].cls == "triton-fused" and rows[2].cls == "attention"
    s = class_summary(rows)
    assert list(s) == ["gemm", "triton-fused", "attention"]
    assert s["attention"] == {"calls_per_step": 0.5, "us_per_step": 1.5, "pct_of_step": 7.5}
    with pytest.raises(ValueError):
        kernel_table(events, steps=0, step_us=1.0)


def test_kernel_classes():
    assert kernel_class("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm>") == "gemm"
    assert kernel_class("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add>") == \
        "elementwise"
    assert kernel_class("void at::native::_scatter_gather_elementwise_kernel") == "copy"
    assert kernel_class("_merge_kernel") == "attention"
    assert kernel_class("mystery") == "other"


def test_cpu_run_writes_tables(tmp_path):
    doc = run(tmp_path, preset="qwen3_tiny", batch=1, context=16, steps=2, rows=5, device="cpu")
    res = doc["paths"]["eager"]
    assert "error" not in res and res["kernels"] and res["step_us"] > 0
    assert any("mm" in k["name"] or "linear" in k["name"] for k in res["kernels"])
    saved = json.loads((tmp_path / "decode_profile.json").read_text())
    assert saved["paths"]["eager"]["kernels_per_step"] == res["kernels_per_step"]
    assert "### eager" in (tmp_path / "decode_profile.md").read_text()
