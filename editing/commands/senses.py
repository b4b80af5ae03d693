"""``editing senses inspect``: what a sense edit changed, or what a Backpack's senses mean."""

from __future__ import annotations

from editing.core.errors import ConfigError


def inspect_senses(edit: str | None = None, model: str | None = None, words: str | None = None, top: int = 5,
                   limit: int | None = 30, allow_unverified: bool = False) -> list[dict]:
    """List the senses a sense edit changed (``--edit``): token, sense index, importance, and the words the sense
    vector scores highest before and after the edit. Or list every sense of some words in a Backpack (``--model``
    with ``--words``): the words each sense vector scores highest, e.g. to see whether a distilled Backpack's senses
    are topics or word pieces.

    Args:
        edit: a sense edit folder (``<run>/edits/ball_<eps>``).
        model: a Backpack (a model folder, such as the one ``editing backpack distill`` writes, or a registered
            name); instead of ``edit``.
        words: with ``model``: comma-separated words, as they appear inside a sentence (e.g. "Paris,ran,doctor").
        top: words per sense (before and after, for an edit).
        limit: show the N senses that changed most (null: all); for ``model``, the first N rows.
        allow_unverified: read an edit saved without ``edit_manifest.json`` (by an older version).

    Returns:
        The rows of the table.
    """
    if (edit is None) == (model is None):
        raise ConfigError("`editing senses inspect` takes --edit <sense edit folder> or --model <Backpack> --words "
                          "<w1,w2,...>, one of the two")
    if model is not None:
        from editing.methods.senses.inspect import format_model_senses, inspect_model_senses
        from editing.models.loading import ModelConfig, load_model

        if not words:
            raise ConfigError("--model needs --words: the words whose senses to list, e.g. --words Paris,ran,doctor")
        loaded = load_model(ModelConfig(name=model))
        rows = inspect_model_senses(loaded.model, loaded.tokenizer, words.split(","), top=top)
        rows = rows[:limit] if limit else rows
        print(format_model_senses(rows))
        return rows

    from editing.edits.load import load_edited
    from editing.methods.senses.inspect import format_inspection, inspect_edit

    rows = inspect_edit(load_edited(edit, allow_unverified=allow_unverified), top=top, limit=limit)
    print(format_inspection(rows))
    return rows
