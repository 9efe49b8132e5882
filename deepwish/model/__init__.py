from deepwish.model.transformer import Block, ForwardContext, Transformer

__all__ = ["Block", "ForwardContext", "Transformer"]
