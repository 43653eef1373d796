"""Hugging Face checkpoints: import (load.py), export (export.py: native architectures, or remote code with
remote.py and template/), and the tokenizer's fast form (tokenizer.py)."""
