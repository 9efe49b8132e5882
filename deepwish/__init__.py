"""deepwish: HF-exact Qwen3 / Qwen3-Next / DeepSeek-V3(.2) / GPT models with training,
decoding and Triton kernels in one readable package."""
import os

# OpenMP threads that spin while waiting make small CPU models several times slower on a
# shared or busy machine; passive waiting costs nothing measurable when the machine is idle.
# Only effective when deepwish is imported before torch (as the `deepwish` command does).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from deepwish.config import ModelConfig, RunConfig, TrainConfig, load_config, model_config
from deepwish.hf.io import load_hf, save_hf
from deepwish.model.transformer import Transformer

__version__ = "0.1.0"
__all__ = ["ModelConfig", "RunConfig", "TrainConfig", "Transformer", "load_config", "load_hf", "model_config",
           "save_hf", "__version__"]
