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


def hf_cached_decode(hf, x: torch.Tensor, k: int) -> torch.Tensor:
    """HF's own cache: prefill x[:, :k], then one token at a time -> logits at positions k-1.. [B, T-k+1, V]."""
    with torch.no_grad():
        out = hf(x[:, :k], use_cache=True)
        steps, cache = [out.logits[:, -1]], out.past_key_values
        for t in range(k, x.shape[1]):
            out = hf(x[:, t:t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits[:, -1])
            cache = out.past_key_values
    return torch.stack(steps, 1)


def check_hf_parity(hf, path, vocab: int, seq: int = 40, greedy: int = 12, decode_from: int = 9) -> None:
    """The full parity contract for one random HF model `hf` (fp32): save_pretrained -> load_hf;
    logits at every position (≤1e-4 relative), prefill + cached decode against HF's own cached
    decode (as long as deepwish's max_seq_len allows), greedy tokens equal HF `generate`, and
    save_hf -> HF from_pretrained gives HF's logits again."""
    from transformers import AutoModelForCausalLM

    from deepwish import load_hf, save_hf
    from deepwish.generate import decode_one_token, generate, prefill

    hf.save_pretrained(path / "hf")
    ours = load_hf(path / "hf", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, vocab, (2, seq), generator=g)
    with torch.no_grad():
        ref = hf(x).logits
        assert rel_err(ref, ours(x).logits) <= 1e-4, "logits at every position"
        L, k = min(seq, ours.cfg.max_seq_len), decode_from
        cache = ours.make_cache(2, L)
        steps = [prefill(ours, x[:, :k], cache)]
        for t in range(k, L):
            steps.append(decode_one_token(ours, x[:, t], torch.full((2,), t), cache))
        assert rel_err(hf_cached_decode(hf, x[:, :L], k), torch.stack(steps, 1)) <= 1e-4, "prefill + cached decode"
    prompt = torch.randint(1, vocab, (1, 7), generator=g)  # token 0 is hf_greedy's pad id
    assert generate(ours, prompt, greedy)[0] == hf_greedy(hf, prompt, greedy), "greedy"
    out = save_hf(ours, path / "export")
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(back) is type(hf)
    with torch.no_grad():
        assert rel_err(ref, back(x).logits) <= 1e-5, "save_hf -> HF from_pretrained"
