from megavq.model.transformer import LMOutput, Transformer

__all__ = ["LMOutput", "Transformer"]
