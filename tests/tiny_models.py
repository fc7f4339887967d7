"""Tiny random-weight causal LMs built from transformers config classes: nothing is downloaded."""
from __future__ import annotations

import torch
import transformers as tf

COMMON = dict(vocab_size=128)

CONFIGS = {
    "gpt2": lambda: tf.GPT2Config(n_embd=32, n_layer=3, n_head=4, n_positions=64, **COMMON),
    "llama": lambda: tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                    num_key_value_heads=2, max_position_embeddings=64, **COMMON),
    "gpt_neox": lambda: tf.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, max_position_embeddings=64, **COMMON),
    "qwen2": lambda: tf.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                    num_key_value_heads=2, max_position_embeddings=64, **COMMON),
    "gemma2": lambda: tf.Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=8, max_position_embeddings=64, **COMMON),
    "phi3": lambda: tf.Phi3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                  num_key_value_heads=4, max_position_embeddings=64, pad_token_id=0, **COMMON),
    "mistral": lambda: tf.MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **COMMON),
    "falcon": lambda: tf.FalconConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, **COMMON),
    "gptj": lambda: tf.GPTJConfig(n_embd=32, n_layer=3, n_head=4, n_positions=64, rotary_dim=4, **COMMON),
    "qwen3": lambda: tf.Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=8, max_position_embeddings=64, **COMMON),
}


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A random-weight model of `arch` in eval mode, float32."""
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(CONFIGS[arch]())
    return model.eval()
