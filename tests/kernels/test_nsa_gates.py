"""kernels/nsa/gates.py under the interpreter: the three branches' gated sum in one launch against
the model's torch form (model/nsa.py NSA.forward): fp16 bit for bit, strided inputs included."""
import pytest
import torch

from deepwish.kernels.nsa.gates import gated_sum


def torch_form(g_logits, o_cmp, o_slc, o_win):
    B, T, H, _ = o_win.shape
    g = torch.sigmoid(g_logits).view(B, T, H, 3).to(o_win.dtype)
    return g[..., 0:1] * o_cmp + g[..., 1:2] * o_slc + g[..., 2:3] * o_win


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B, T, H, D", [(2, 1, 4, 32), (1, 3, 20, 24)])   # 20 heads: two head tiles; D not a power of 2
def test_gated_sum_is_the_torch_form(dtype, B, T, H, D):
    torch.manual_seed(0)
    g = torch.randn(B, T, 3 * H + 5, dtype=dtype)[..., 5:]          # a view into a wider projection
    o_cmp = torch.randn(B, H, T, D, dtype=dtype).transpose(1, 2)    # strided like a [B, H, T, D] output
    o_slc, o_win = torch.randn(2, B, T, H, D, dtype=dtype)
    got = gated_sum(g, o_cmp, o_slc, o_win)
    want = torch_form(g, o_cmp, o_slc, o_win)
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-6 if dtype == torch.float32 else 0, rtol=0)


def test_mismatched_shapes_are_named():
    o = torch.zeros(1, 1, 4, 8)
    with pytest.raises(ValueError, match=r"g \[B, T, 3H\]"):
        gated_sum(torch.zeros(1, 1, 11), o, o, o)


def test_the_custom_op_passes_opcheck():
    """torch.compile's view of the op: its fake form's shapes and strides equal the kernel's output,
    and nothing is mutated (torch.library.opcheck's schema, fake-tensor and AOT checks)."""
    g = torch.randn(1, 2, 12)
    o_cmp, o_slc, o_win = torch.randn(3, 1, 2, 4, 8)
    torch.library.opcheck(torch.ops.deepwish.nsa_gated_sum.default, (g, o_cmp, o_slc, o_win, "off"))
