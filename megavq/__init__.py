"""megavq: sparse mixture-of-experts language models with research-grade routers, trained with DeepSpeed."""
__version__ = "0.1.0"
