"""``editing generate``: what an edit changes in the text a model writes, base and edited side by side."""

from __future__ import annotations

from editing.commands import repeatable


@repeatable("prompt")
def generate(edit: str, prompt: str | list[str], max_new_tokens: int = 20, sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             allow_unverified: bool = False, chat_template: bool | str | None = None) -> list[dict]:
    """Continue prompts with the base model and with the edited one, and print both continuations side by side.

    Args:
        edit: an edit folder (``<run>/edits/ball_<eps>``, or one saved by the Python API's ``save``); any kind
            (LoRA, full finetuning, MEMIT, senses).
        prompt: a text to continue (repeat ``--prompt`` for several).
        max_new_tokens: the most tokens to add to each prompt.
        sample: draw each token instead of taking the most likely one (greedy, the default).
        temperature: with ``sample``: divide the logits by this before drawing.
        top_k: with ``sample``: draw among the k most likely tokens only (0: all).
        top_p: with ``sample``: draw among the most likely tokens whose probabilities sum to p (1: all).
        seed: with ``sample``: the seed of the draws (each prompt and model starts from it).
        allow_unverified: apply an edit saved without ``edit_manifest.json`` (by an older version).
        chat_template: ask each prompt as the user's turn of the tokenizer's chat template (true), or of a Jinja
            template (its text or a file); default: as the edit was fitted (``--data.chat_template``, read from its
            run folder; false outside one).

    Returns:
        Per prompt: ``{"prompt", "base", "edited"}``.
    """
    from editing.core.errors import ConfigError
    from editing.core.textfiles import not_text
    from editing.data.chat import load_chat_template
    from editing.edits.combine import fitted_chat_template
    from editing.edits.load import load_edited
    from editing.models.generation import Sampling, continue_module
    from editing.runs.tables import markdown_table

    prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
    if not prompts:
        raise ConfigError("give at least one --prompt TEXT to continue")
    for position, text in enumerate(prompts, start=1):
        problem = not_text(text, from_bytes=True) if isinstance(text, str) else None
        if problem is not None:  # checked before the model loads; the tokenizer would raise a bare TypeError
            raise ConfigError(f"--prompt {position}: {problem}; give the prompt as UTF-8 text (check the encoding "
                              "of the terminal or script that passes it)")
    if not sample and (temperature != 1.0 or top_k != 0 or top_p != 1.0):
        raise ConfigError("--temperature, --top_k and --top_p apply only with --sample true (greedy is the default)")
    sampling = Sampling(sample=sample, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    module = load_edited(edit, allow_unverified=allow_unverified)
    if chat_template is None:
        chat_template = fitted_chat_template(edit)
    chat = load_chat_template(module.loaded.tokenizer, chat_template, field="--chat_template")
    rows = []
    for text in prompts:
        base = continue_module(module, text, max_new_tokens, sampling, base=True, chat=chat)
        edited = continue_module(module, text, max_new_tokens, sampling, chat=chat)
        rows.append({"prompt": text, "base": base, "edited": edited})
    how = "greedy" if not sample else f"sampled (temperature {temperature}, top_k {top_k}, top_p {top_p}, seed {seed})"
    how += ", in the chat template" if chat is not None else ""
    print(f"edit: {edit} ({module.edit_kind}, on {module.identity['name']}); {how}, at most {max_new_tokens} tokens")
    print(markdown_table(("prompt", "base", "edited", "same"),
                         ((_cell(r["prompt"]), _cell(r["base"]), _cell(r["edited"]),
                           "yes" if r["base"] == r["edited"] else "no") for r in rows)))
    return rows


def _cell(text: str) -> str:
    """Text in one Markdown table cell: line breaks shown as ``\\n``, pipes escaped."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("|", "\\|")
