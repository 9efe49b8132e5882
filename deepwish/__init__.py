"""deepwish: HF-exact Qwen3 / Qwen3-Next / DeepSeek-V3(.2) / GPT models with training,
decoding and Triton kernels in one readable package.

Importing the package has no side effects and does not import torch: the names below are
loaded on first use (so the `deepwish` command can set process-wide policy before torch loads).
"""
import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ModelConfig": "deepwish.config", "RunConfig": "deepwish.config", "TrainConfig": "deepwish.config",
    "load_config": "deepwish.config", "model_config": "deepwish.config",
    "load_hf": "deepwish.hf.io", "save_hf": "deepwish.hf.io",
    "Transformer": "deepwish.model.transformer", "ModelOutput": "deepwish.model.transformer",
    "Objective": "deepwish.model.objective",
    "generate_text": "deepwish.generate",
}
__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'deepwish' has no attribute {name!r}")
