"""Shared helpers for HF parity tests: build a random tiny HF model, save it, load it back."""
from __future__ import annotations

import torch


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    return float((ref - out).norm() / ref.norm().clamp_min(1e-30))


def random_hf_model(model_cls, cfg, seed: int | None = None):
    """Instantiate an HF model and randomise every parameter (HF inits some to zeros/ones,
    which would hide mapping mistakes, e.g. swapped norms)."""
    if seed is not None:
        torch.manual_seed(seed)
    model = model_cls(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p)) if "norm" in name else p.normal_(0, 0.1)
            else:
                p.normal_(0, 0.08)
    return model


def hf_greedy(model, prompt: torch.Tensor, n: int) -> list[int]:
    # An explicit all-ones mask: without it HF infers padding from pad_token_id and would mask
    # out any prompt token that happens to equal it.
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
                         min_new_tokens=n, pad_token_id=0, eos_token_id=None)
    return out[0, prompt.shape[1]:].tolist()
