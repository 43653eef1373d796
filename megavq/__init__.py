"""megavq: sparse mixture-of-experts language models with research-grade routers, trained with DeepSpeed."""
__version__ = "0.1.0"

from megavq.convert.load import load_model  # noqa: E402

__all__ = ["load_model"]
