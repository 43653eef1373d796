"""Configuration of a megavq transformer exported for Hugging Face transformers (modeling_megavq.py beside it).

Written by megavq's export (`python scripts/export.py --format hf --remote_code`); needs torch and transformers
only. Hugging Face names where transformers and its tools read them (hidden_size, num_hidden_layers,
max_position_embeddings = the trained context, ...), megavq's own choices otherwise:
  norm        rmsnorm | layernorm             pos   rope | learned
  mlp         swiglu | gelu (tanh)            qkv_bias, out_bias, mlp_bias
  moe         None for a dense model, else {"every", "router", "router_options", "num_experts", "top_k",
              "d_expert"}: block i (zero-based) is MoE when (i + 1) % every == 0
  megavq_config  the whole megavq configuration, so that megavq.load_model reads the directory back
"""
from transformers import PretrainedConfig


class MegavqConfig(PretrainedConfig):
    model_type = "megavq"

    def __init__(self, vocab_size: int = 4096, hidden_size: int = 128, intermediate_size: int = 256,
                 num_hidden_layers: int = 4, num_attention_heads: int = 4, num_key_value_heads: int | None = None,
                 max_position_embeddings: int = 128, rope_theta: float = 10000.0, norm_eps: float = 1e-5,
                 norm: str = "rmsnorm", pos: str = "rope", mlp: str = "swiglu", qkv_bias: bool = False,
                 out_bias: bool = False, mlp_bias: bool = False, tie_word_embeddings: bool = True,
                 initializer_range: float = 0.02, moe: dict | None = None, megavq_config: dict | None = None,
                 **kwargs):
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = hidden_size // num_attention_heads
        self.max_position_embeddings, self.rope_theta, self.norm_eps = max_position_embeddings, rope_theta, norm_eps
        self.norm, self.pos, self.mlp = norm, pos, mlp
        self.qkv_bias, self.out_bias, self.mlp_bias = qkv_bias, out_bias, mlp_bias
        self.initializer_range, self.moe, self.megavq_config = initializer_range, moe, megavq_config
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
