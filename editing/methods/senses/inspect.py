"""What a Backpack's senses mean: for a sense edit, each selected sense's token, importance, and the words its
vector scores highest through the LM head before and after the edit (the paper's figure 4 view); for a model, the
top words of every sense of chosen words (what a distilled Backpack learned)."""

from __future__ import annotations

import torch

from editing.core.errors import ConfigError
from editing.methods.senses.edit import SENSES_KIND
from editing.models.architecture import backpack_of


def top_words(model, tokenizer, vectors: torch.Tensor, top: int) -> list[list[str]]:
    """The ``top`` tokens each vector (n, d) scores highest through the LM head."""
    head = model.get_output_embeddings().weight.float()
    scores = vectors.float() @ head.T
    ids = scores.topk(top, dim=-1).indices.tolist()
    return [[tokenizer.decode([i]) for i in row] for row in ids]


@torch.no_grad()
def inspect_edit(module, top: int = 5, limit: int | None = None) -> list[dict]:
    """Rows describing each selected sense of a loaded sense edit, largest change first.

    Args:
        module: the edit applied to its base model (``editing.edits.load.load_edited``, which checked its hashes and
            values).
        top: words listed per sense, before and after.
        limit: list only the N senses whose vectors changed most.

    Returns:
        One dict per sense: token, vocab id, sense index, importance, change norm, top words before/after.

    Raises:
        ConfigError: the edit is not a sense edit.
    """
    kind = getattr(module, "edit_kind", None)
    if kind != SENSES_KIND:
        raise ConfigError(f"{module.identity.get('edit', 'the edit')} is not a sense edit (its kind is {kind!r}); "
                          "`editing senses inspect` reads the edits/ball_<eps> folders of a senses fit run")
    tensors = module.applied.tensors
    model = module.model
    backpack = backpack_of(model)
    ids, senses = tensors["vocab_ids"], tensors["sense_ids"]
    with module.reference():  # the senses without the edit
        base = backpack.sense_network(backpack.get_input_embeddings()(ids)[None])[0]  # (k, n, d)
    before = base[senses, torch.arange(ids.numel())]
    after = before + tensors["vectors"].to(before.dtype)
    tok = module.tokenizer
    words_before, words_after = top_words(model, tok, before, top), top_words(model, tok, after, top)
    importance = tensors.get("importance")
    rows = []
    for i in range(ids.numel()):
        rows.append({"token": tok.decode([int(ids[i])]), "vocab_id": int(ids[i]), "sense": int(senses[i]),
                     "importance": None if importance is None else float(importance[i]),
                     "change_norm": float(tensors["vectors"][i].norm()),
                     "before": words_before[i], "after": words_after[i]})
    rows.sort(key=lambda r: -r["change_norm"])
    return rows[:limit] if limit else rows


def format_inspection(rows: list[dict]) -> str:
    """A Markdown table of ``inspect_edit`` rows."""
    lines = ["| token | id | sense | importance | change | top words before | top words after |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        imp = "-" if r["importance"] is None else f"{r['importance']:.3f}"
        lines.append(f"| {r['token']!r} | {r['vocab_id']} | {r['sense']} | {imp} | {r['change_norm']:.3f} | "
                     f"{' '.join(repr(w) for w in r['before'])} | {' '.join(repr(w) for w in r['after'])} |")
    return "\n".join(lines)


@torch.no_grad()
def inspect_model_senses(model, tokenizer, words: list[str], top: int = 5) -> list[dict]:
    """Every sense of each of ``words`` in a Backpack, with the words each sense vector scores highest.

    Args:
        model: a Backpack LM (``backpack_of`` finds its body).
        tokenizer: its tokenizer.
        words: words as they appear inside a sentence (a leading space is added, so "Paris" is " Paris"); a word
            of several tokens gets rows for each of its tokens.
        top: words listed per sense.

    Returns:
        One dict per (token, sense): word, token, vocab id, sense index, the sense vector's norm, its top words.

    Raises:
        ConfigError: a word is empty.
    """
    backpack = backpack_of(model)
    rows = []
    for word in words:
        if not word.strip():
            raise ConfigError(f"--words holds an empty word ({words!r}); separate words with commas")
        ids = tokenizer(" " + word.strip(), add_special_tokens=False)["input_ids"]
        ids_t = torch.tensor(ids, dtype=torch.long, device=backpack.get_input_embeddings().weight.device)
        senses = backpack.sense_network(backpack.get_input_embeddings()(ids_t)[None])[0]  # (k, n, d)
        for j, vocab_id in enumerate(ids):
            vectors = senses[:, j]
            for sense, (vector, best) in enumerate(zip(vectors, top_words(model, tokenizer, vectors, top),
                                                       strict=True)):
                rows.append({"word": word.strip(), "token": tokenizer.decode([vocab_id]), "vocab_id": vocab_id,
                             "sense": sense, "norm": float(vector.norm()), "top": best})
    return rows


def format_model_senses(rows: list[dict]) -> str:
    """A Markdown table of ``inspect_model_senses`` rows."""
    lines = ["| word | token | sense | norm | top words |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['word']} | {r['token']!r} | {r['sense']} | {r['norm']:.2f} | "
                     f"{' '.join(repr(w) for w in r['top'])} |")
    return "\n".join(lines)
