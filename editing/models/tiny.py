"""Tiny random models of the Llama, GPT-NeoX, GPT-2 and Backpack families, for tests (real tokenizers, random
weights)."""

from __future__ import annotations

import torch

TINY_MODELS: tuple[str, ...] = ("tiny-llama", "tiny-gpt2", "tiny-neox", "tiny-backpack")
TINY_TOKENIZERS: dict[str, str] = {"tiny-llama": "smollm2", "tiny-gpt2": "gpt2", "tiny-neox": "neox",
                                   "tiny-backpack": "gpt2"}


def tiny_config(name: str, vocab_size: int):
    """A small config of the family ``name`` (hidden 64, 4 layers, context 512)."""
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    if name == "tiny-llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if name == "tiny-gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=4, n_head=4, n_positions=512,
                          bos_token_id=50256, eos_token_id=50256)
    if name == "tiny-backpack":
        from editing.models.backpack import BackpackConfig

        return BackpackConfig(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=512, num_senses=4,
                              sense_intermediate_scale=2, bos_token_id=50256, eos_token_id=50256)
    if name == "tiny-neox":
        return GPTNeoXConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                             num_attention_heads=4, max_position_embeddings=512, rotary_pct=0.25,
                             bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
    raise ValueError(f"unknown tiny model {name!r}")


def build_tiny(name: str, vocab_size: int, seed: int = 0):
    """Build a tiny model with deterministic random weights (same ``seed``, same weights)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(name, vocab_size)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.random.set_rng_state(state)
    return model
