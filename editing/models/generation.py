"""Continuing a prompt with a model: greedy by default, or sampled with a seed (``editing generate``, the Python API).

One loop for every model of the package (Hugging Face models, peft-wrapped ones, the Backpack, the ensemble): each
new token comes from the LM head applied in fp32 to the final hidden state of the last position, the way the scorer
computes its log-probabilities (``editing.models.architecture``), so what is generated agrees with what is measured.
The prompt is tokenized as a training prefix is (the tokenizer's own special tokens included).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from editing.core.errors import ConfigError
from editing.core.textfiles import not_text
from editing.models.architecture import capture_final_hidden, head_logits


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: the most likely one (``sample`` false, the default) or a draw."""

    sample: bool = False
    """Draw each token from the (tempered, truncated) distribution instead of taking the most likely one."""
    temperature: float = 1.0
    """Divide the logits by this before drawing (below 1: closer to greedy)."""
    top_k: int = 0
    """Draw only among the k most likely tokens (0: all)."""
    top_p: float = 1.0
    """Draw only among the most likely tokens whose probabilities sum to p (1: all)."""
    seed: int = 0
    """Seed of the draws (the same seed gives the same continuation)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(f"temperature={self.temperature} must be a positive number, e.g. 0.7")
        if self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k} must be >= 0 (0 keeps every token)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p} must be in (0, 1] (1 keeps every token)")


GREEDY = Sampling()


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """The token chosen from the fp32 ``logits`` (vocab,) of one position."""
    if not sampling.sample:
        return int(torch.argmax(logits))
    logits = logits.float().cpu() / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1:
        order = torch.argsort(logits, descending=True)
        probs = torch.softmax(logits[order], -1)
        # keep the smallest prefix whose mass reaches top_p (the token that crosses it included)
        drop = (torch.cumsum(probs, -1) - probs) >= sampling.top_p
        logits[order[drop]] = float("-inf")
    return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))


@torch.no_grad()
def continue_prompt(model, tokenizer, prompt: str, max_new_tokens: int = 20, sampling: Sampling = GREEDY,
                    max_length: int | None = None, chat=None) -> str:
    """The text ``model`` generates after ``prompt``.

    Args:
        model: a causal LM of the package (its LM head is read through ``get_output_embeddings``).
        tokenizer: its tokenizer.
        prompt: the text to continue.
        max_new_tokens: the most tokens to add (generation also stops at the tokenizer's end-of-text token).
        sampling: greedy (default) or sampling settings.
        max_length: the model's context; a longer sequence keeps its last ``max_length`` tokens.
        chat: an ``editing.data.chat.ChatTemplate``: the prompt is the user's turn and the continuation the
            assistant's reply (generation also stops at the end of the turn).

    Returns:
        The continuation alone (decoded new tokens, without the prompt).
    """
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens} must be at least 1")
    problem = not_text(prompt)
    if problem is not None:
        raise ConfigError(f"prompt {prompt!r}: {problem}; give the prompt as UTF-8 text")
    ids = list(tokenizer(prompt)["input_ids"]) if chat is None else chat.encode(prompt)
    if not ids:
        raise ConfigError(f"prompt {prompt!r} has no tokens: give some text to continue")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(sampling.seed) if sampling.sample else None
    stops = {tokenizer.eos_token_id}
    if chat is not None:  # a chat model ends its turn with its own token (e.g. <|im_end|>), often not the EOS
        stops |= set(chat.turn_end_ids())
    was_training = model.training
    model.eval()
    new: list[int] = []
    try:
        for _ in range(max_new_tokens):
            context = ids + new
            if max_length is not None:
                context = context[-max_length:]
            input_ids = torch.tensor([context], device=device)
            with capture_final_hidden(model) as store:
                model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False)
            token = next_token(head_logits(model, store["hidden"][0, -1:])[0], sampling, generator)
            if token in stops:
                break
            new.append(token)
    finally:
        model.train(was_training)
    return tokenizer.decode(new)


def continue_module(module, prompt: str, max_new_tokens: int = 20, sampling: Sampling = GREEDY,
                    base: bool = False, chat=None) -> str:
    """``prompt`` continued by an ``EditingModule``'s model, or by its base model (``base``: within its
    ``reference()``, where the edit is off).

    Args:
        module: an ``EditingModule`` (e.g. an edit loaded by ``editing.edits.load.load_edited``).
        prompt: the text to continue.
        max_new_tokens: the most tokens to add.
        sampling: greedy (default) or sampling settings.
        base: continue with p0, the model without the edit.
        chat: a chat template the prompt is asked through (``continue_prompt``).

    Returns:
        The continuation alone.
    """
    loaded = module.loaded
    if not base:
        return continue_prompt(module.model, loaded.tokenizer, prompt, max_new_tokens, sampling, loaded.max_length,
                               chat)
    with module.reference() as model:
        return continue_prompt(model, loaded.tokenizer, prompt, max_new_tokens, sampling, loaded.max_length, chat)


__all__ = ["GREEDY", "Sampling", "continue_module", "continue_prompt", "next_token"]
