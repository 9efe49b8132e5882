"""The index-score kernel's selection keys on the GPU at real size (64 index heads of 128, bf16, a
block of queries against 8192 keys, documents): `index_keys` equals the key built in torch from the
same kernel's scores bit for bit, and its top-k is `topk_latest_indices`' set (run with -m gpu)."""
import pytest
import torch

from deepwish.kernels.index_scores import triton as tk
from deepwish.model.attention import attention_mask
from deepwish.model.dsa_rows import top_of_keys, topk_latest_indices

pytestmark = pytest.mark.gpu


def test_index_keys_equal_torch_keys_at_real_size(cuda):
    B, C, S, H, D, K = 1, 96, 8192, 64, 128, 2048
    g = torch.Generator(device=cuda).manual_seed(0)
    q = torch.randn(B, C, H, D, device=cuda, generator=g).to(torch.bfloat16)
    k = torch.randn(B, S, D, device=cuda, generator=g).to(torch.bfloat16)
    w = torch.randn(B, C, H, device=cuda, generator=g) * H ** -0.5
    q_pos = torch.arange(S - C, S, device=cuda)[None]
    k_pos = torch.arange(S, device=cuda)[None]
    k_doc = (torch.arange(S, device=cuda) >= 3000).long()[None]
    q_doc = k_doc[:, S - C:]
    scores = tk.index_scores(q, w, k, D ** -0.5)
    vis = attention_mask(q_pos, k_pos, 0, q_doc, k_doc)[:, 0]
    s = scores.masked_fill(~vis, float("-inf")) + 0.0
    bits = s.view(torch.int32)
    want = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(torch.int64) * (1 << 32) + torch.arange(S, device=cuda)
    got = tk.index_keys(q, w, k, D ** -0.5, q_pos, k_pos, q_doc, k_doc)
    assert torch.equal(got, want)
    assert torch.equal(top_of_keys(got, K).sort(-1).values, topk_latest_indices(scores, vis, K).sort(-1).values)
