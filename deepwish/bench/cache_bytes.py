"""Decode-cache bytes per token: MLA/DSA presets against GQA models of similar size.

    python -m deepwish.bench.cache_bytes [--dtype bf16] [--context 32768]

Every number is measured, not derived: each model is built on the meta device, its real
`make_cache` is called, and `ModelCache.nbytes()` is divided by the cache length. The GQA
comparison models are Qwen3 presets or hypothetical GQA twins stated in the table.
"""
from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from deepwish.bench.env import doc_summary
from deepwish.config import ModelConfig, load_config
from deepwish.model.transformer import Transformer

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def cache_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16, length: int = 64) -> int:
    """Bytes of decode cache one token occupies over all layers of `cfg` (measured on meta)."""
    with torch.device("meta"):
        model = Transformer(replace(cfg, n_mtp=0, max_seq_len=max(cfg.max_seq_len, length)))
    cache = model.make_cache(1, length, dtype=dtype, device="meta")
    total = cache.nbytes()
    if total % length:
        raise RuntimeError(f"cache of {total} bytes is not a whole number of bytes per token")
    return total // length


def gqa_twin(cfg: ModelConfig, n_kv_heads: int, head_dim: int, label: str) -> tuple[str, ModelConfig]:
    """A GQA model with the layer count and head count of `cfg` (a hypothetical comparison)."""
    twin = ModelConfig(family="qwen3", mixer="gqa", vocab_size=cfg.vocab_size, d_model=cfg.d_model,
                       n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
                       d_ff=cfg.d_ff, max_seq_len=cfg.max_seq_len)
    return label, twin


def rows() -> list[tuple[str, ModelConfig]]:
    v3 = load_config("deepseek_v3_671b").model
    v32 = load_config("deepseek_v32_671b").model
    nano = load_config("deepseek_v3_nano").model
    small = load_config("deepseek_v3_small").model
    return [
        ("DeepSeek-V3 671B (MLA, 61 L)", v3),
        ("DeepSeek-V3.2 671B (MLA + indexer key, 61 L)", v32),
        gqa_twin(v3, 8, 128, "hypothetical GQA twin of V3: 61 L, 128 q / 8 kv heads x 128"),
        ("deepseek_v3_nano (MLA, 12 L)", nano),
        gqa_twin(nano, 4, 64, "GQA twin of nano: 12 L, 8 q / 4 kv heads x 64"),
        ("deepseek_v3_small (MLA, 16 L)", small),
        gqa_twin(small, 4, 64, "GQA twin of small: 16 L, 12 q / 4 kv heads x 64"),
        ("Qwen3-0.6B (GQA, 28 L, 16 q / 8 kv x 128)", load_config("qwen3_0.6b").model),
        ("Qwen3-8B (GQA, 36 L, 32 q / 8 kv x 128)", load_config("qwen3_8b").model),
    ]


def table(dtype: str = "bf16", context: int = 32768) -> str:
    dt = DTYPES[dtype]
    out = [f"| model | cache numbers per token per layer | {dtype} bytes per token | GiB at {context} tokens |",
           "|---|---:|---:|---:|"]
    for label, cfg in rows():
        b = cache_bytes_per_token(cfg, dt)
        per_layer = b // (cfg.n_layers * dt.itemsize)
        out.append(f"| {label} | {per_layer:,} | {b:,} | {b * context / 2**30:.2f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=doc_summary(__doc__))
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--context", type=int, default=32768)
    a = p.parse_args(argv)
    print(table(a.dtype, a.context))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
