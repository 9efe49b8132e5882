from deepwish.model.block import Block, ForwardContext
from deepwish.model.objective import Objective
from deepwish.model.transformer import ModelOutput, Transformer

__all__ = ["Block", "ForwardContext", "ModelOutput", "Objective", "Transformer"]
