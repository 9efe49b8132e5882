"""model.decode_fusion and model.decode_pdl on the CPU (the GEMV and decode kernels under the
interpreter): a decode step whose GEMVs take in the block's norms, SwiGLU and residual adds gives
the logits and caches of the separate ops, and the fused kernels are what run; and each mixer or
FFN without a fused form keeps the plain composition."""
import dataclasses
from unittest import mock

import pytest
import torch

from deepwish.config import ConfigError, model_config
from deepwish.generate import decode_one_token
from deepwish.model.transformer import Transformer


def _tiny(**kw):
    kw = {"decode_matmul": "triton", **kw}
    return model_config("qwen3_tiny", attn_backend="triton", n_layers=2, vocab_size=64, max_seq_len=32,
                        d_model=32, d_ff=48, n_heads=2, n_kv_heads=1, head_dim=16, decode_prologue=True, **kw)


def _run(model, x):
    """Prefill 6 tokens, then 3 single-token steps -> (logits [2, 9, V], cache, the GEMV op's calls)."""
    import deepwish.kernels.gemv.triton as gk
    cache = model.make_cache(2, 12)
    with torch.no_grad(), mock.patch.object(gk, "_gemv_op", wraps=gk._gemv_op) as op:
        outs = [model(x[:, :6], positions=torch.arange(6).expand(2, 6), cache=cache).logits]
        outs += [decode_one_token(model, x[:, t], torch.full((2,), t), cache)[:, None] for t in range(6, 9)]
    return torch.cat(outs, 1), cache, op.call_args_list


@pytest.mark.parametrize("zero_centered", [False, True])
def test_fused_decode_step_equals_the_separate_ops(zero_centered):
    torch.manual_seed(0)
    plain, fused = (Transformer(_tiny(decode_fusion=on, norm_zero_centered=zero_centered)).eval()
                    for on in (False, True))
    with torch.no_grad():  # weights away from their init, so the norm weights (ones / zeros) matter
        for p in plain.parameters():
            p.add_(0.1 * torch.randn_like(p))
    fused.load_state_dict(plain.state_dict())
    x = torch.randint(0, 64, (2, 9))
    (want, c0, calls0), (got, c1, calls1) = _run(plain, x), _run(fused, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(c0.layers, c1.layers):
        torch.testing.assert_close(b.k[:, :, :9], a.k[:, :, :9], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.v[:, :, :9], a.v[:, :, :9], rtol=1e-5, atol=1e-5)
    # 2 layers x 3 steps x 4 GEMVs both ways; fused: q/k/v and gate/up with the norm in, o and down
    # with the residual add, gate/up with SwiGLU's activation; plain: none of them
    assert len(calls0) == len(calls1) == 24
    norm, glu, residual = (sum(c.args[i] is not None and c.args[i] is not False for c in calls1) for i in (3, 6, 7))
    assert (norm, glu, residual) == (12, 6, 12)
    assert all(c.args[6] == (c.args[3] is not None and c.args[1].shape[0] == 2 * 48) for c in calls1), \
        "SwiGLU goes with gate/up's projection only"
    assert all(c.args[3] is None and not c.args[6] and c.args[7] is None for c in calls0)


def test_branches_without_a_fused_form_keep_the_plain_composition():
    """An MoE FFN (no fused form) and a non-SiLU FFN (the kernel's epilogue is SiLU's) compose the
    norm and the add as before; with a gradient (training) nothing fuses."""
    _composes_plainly(Transformer(_tiny(decode_fusion=True, hidden_act="gelu_pytorch_tanh")).eval())
    x = torch.randn(2, 1, 32)
    gelu_free = Transformer(_tiny(decode_fusion=True)).train()
    assert gelu_free.blocks[0].ffn.residual_forward(x, gelu_free.blocks[0].ffn_norm) is None  # grad enabled


def test_fusion_without_the_gemv_keeps_the_plain_composition():
    """decode_fusion is on by default; with decode_matmul=torch (cuBLAS, no GEMV to fuse into) the
    branches compose the norm and the add as before."""
    _composes_plainly(Transformer(_tiny(decode_fusion=True, decode_matmul="torch")).eval())


def _composes_plainly(model):
    """The first block's FFN has no fused form here: residual_branch is x + ffn(norm(x))."""
    from deepwish.model.block import residual_branch
    block = model.blocks[0]
    x = torch.randn(2, 1, 32)
    with torch.no_grad():
        assert block.ffn.residual_forward(x, block.ffn_norm) is None
        y, _ = residual_branch(block.ffn, block.ffn_norm, x)
        torch.testing.assert_close(y, x + block.ffn(block.ffn_norm(x))[0])


def test_pdl_settings():
    """decode_pdl: "on" asks the kernels for programmatic dependent launch, and a device without it is
    an error naming the kernel, not a silent launch without it; "auto" (the default) takes it where
    the device has it; "off" never (the interpreter runs without it). The setting changes no number."""
    from deepwish.kernels import pdl
    cpu = torch.device("cpu")
    assert pdl.launch_options(False, cpu, "gemv") == pdl.launch_options("off", cpu, "gemv") == (False, {})
    assert [pdl.setting(v, "gemv") for v in (True, False, "auto")] == ["on", "off", "auto"]
    with pytest.raises(ValueError, match="gemv: pdl='yes' is not one of"):
        pdl.setting("yes", "gemv")
    with mock.patch.object(pdl, "_INTERPRET", False):
        assert not pdl.use_pdl("auto", cpu, "gemv")
        for on in (True, "on"):
            with pytest.raises(ValueError, match="gemv: pdl"):
                pdl.launch_options(on, cpu, "gemv")
        with mock.patch.object(pdl, "_has_pdl", lambda index: True):
            assert pdl.launch_options("auto", torch.device("cuda", 0), "gemv") == (True, {"launch_pdl": True})
        with mock.patch.object(pdl, "_has_pdl", lambda index: False):
            assert pdl.launch_options("auto", torch.device("cuda", 0), "gemv") == (False, {})
    assert model_config("qwen3_0.6b").decode_pdl == "auto"
    with pytest.raises(ConfigError, match="decode_pdl='sometimes' is not one of auto, on, off"):
        _tiny(decode_pdl="sometimes")
    cfg = _tiny(decode_fusion=True, decode_pdl="on")
    torch.manual_seed(0)
    a, b = Transformer(cfg).eval(), Transformer(dataclasses.replace(cfg, decode_pdl="off")).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 64, (2, 9))
    torch.testing.assert_close(_run(a, x)[0], _run(b, x)[0], rtol=0, atol=0)
    assert a.blocks[0].ffn.w_down.pdl == a.blocks[0].mixer.pdl == "on"
