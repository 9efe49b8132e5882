"""deepwish: HF-exact Qwen3 / Qwen3-Next / DeepSeek-V3(.2) / GPT models with training,
decoding and Triton kernels in one readable package."""
from deepwish.config import ModelConfig, RunConfig, TrainConfig, load_config, model_config
from deepwish.hf.io import load_hf, save_hf
from deepwish.model.transformer import Transformer

__version__ = "0.1.0"
__all__ = ["ModelConfig", "RunConfig", "TrainConfig", "Transformer", "load_config", "load_hf", "model_config",
           "save_hf", "__version__"]
