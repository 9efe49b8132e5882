from deepwish.hf.io import CheckpointError, config_from_hf, load_hf, save_hf

__all__ = ["CheckpointError", "config_from_hf", "load_hf", "save_hf"]
