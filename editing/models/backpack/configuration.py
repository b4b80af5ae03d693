"""The Backpack configuration (SPEC section 7): a GPT-2 configuration plus the sense settings.

One config class covers two layouts:

* the GPT-2 layout of ``stanfordnlp/backpack-gpt2`` (``contextualizer`` unset): the contextualization network is a
  GPT-2 transformer built from this config's own GPT-2 fields, stored under ``backpack.gpt2_model``;
* a Backpack around any Hugging Face base model (``contextualizer`` = that model's config as a dict, e.g. a Llama
  cut to its first N layers), stored under ``backpack.contextualizer``; the word embeddings and the tied LM head are
  that model's input embeddings. ``editing backpack distill`` builds these.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, GPT2Config

BACKPACK_MODEL_TYPE = "backpack-gpt2"


class BackpackConfig(GPT2Config):
    """Configuration of a Backpack language model.

    Args:
        num_senses: sense vectors per word (k).
        sense_intermediate_scale: width of the sense network's final MLP, as a multiple of the embedding width.
        contextualizer: config dict of a Hugging Face base model to use as the contextualization network instead of
            the built-in GPT-2 (``model_type`` key required); its hidden size and vocabulary become this model's.
        sense_attention_dim: width of the query/key projection that computes alpha (default: the embedding width);
            it must be divisible by ``num_senses``.
        **kwargs: GPT-2 configuration fields.
    """

    model_type = BACKPACK_MODEL_TYPE

    def __init__(self, num_senses: int = 16, sense_intermediate_scale: int = 4,
                 contextualizer: dict[str, Any] | None = None, sense_attention_dim: int | None = None,
                 **kwargs) -> None:
        kwargs.setdefault("vocab_size", 50264)
        kwargs.setdefault("n_positions", 512)
        kwargs.setdefault("scale_attn_by_inverse_layer_idx", True)
        # the hub checkpoint's auto_map points at remote code, which this native class replaces
        kwargs.pop("auto_map", None)
        if contextualizer is not None:
            inner = self.contextualizer_config_from(contextualizer)
            kwargs["n_embd"] = inner.hidden_size
            kwargs["vocab_size"] = inner.vocab_size
            kwargs["n_positions"] = getattr(inner, "max_position_embeddings", kwargs["n_positions"])
            kwargs.setdefault("bos_token_id", inner.bos_token_id)
            kwargs.setdefault("eos_token_id", inner.eos_token_id)
        super().__init__(**kwargs)
        self.num_senses = num_senses
        self.sense_intermediate_scale = sense_intermediate_scale
        self.contextualizer = contextualizer
        self.sense_attention_dim = sense_attention_dim
        self.tie_word_embeddings = True
        if self.attention_dim % num_senses:
            raise ValueError(f"sense attention width {self.attention_dim} is not divisible by num_senses={num_senses}")

    @property
    def attention_dim(self) -> int:
        """Width of the query and key projections of alpha."""
        return self.sense_attention_dim or self.n_embd

    @staticmethod
    def contextualizer_config_from(spec: dict[str, Any]):
        """A transformers config object from a contextualizer dict."""
        spec = dict(spec)
        model_type = spec.pop("model_type", None)
        if model_type is None:
            raise ValueError("BackpackConfig.contextualizer needs a 'model_type' key")
        return AutoConfig.for_model(model_type, **spec)

    def contextualizer_config(self):
        """The contextualization network's config (a GPT-2 config for the GPT-2 layout)."""
        if self.contextualizer is None:
            return GPT2Config(**{k: v for k, v in self.to_dict().items()
                                 if k not in ("num_senses", "sense_intermediate_scale", "contextualizer",
                                              "sense_attention_dim", "model_type", "architectures")})
        return self.contextualizer_config_from(self.contextualizer)


def is_backpack_config(config: dict[str, Any]) -> bool:
    """Whether a config.json dict describes a Backpack.

    The hub checkpoint says ``model_type: gpt2`` (with remote code in ``auto_map``), so a Backpack is recognised by
    its sense fields or its architecture name, never by model_type alone.
    """
    if config.get("model_type") == BACKPACK_MODEL_TYPE:
        return True
    architectures = config.get("architectures") or []
    return "num_senses" in config or any("Backpack" in str(a) for a in architectures)
