"""``editing senses inspect``: what a sense edit changed."""

from __future__ import annotations


def inspect_senses(edit: str, top: int = 5, limit: int | None = 30, allow_unverified: bool = False) -> list[dict]:
    """List the senses a sense edit changed: token, sense index, importance, and the words the sense vector scores
    highest before and after the edit.

    Args:
        edit: a sense edit folder (``<run>/edits/ball_<eps>``).
        top: words per sense, before and after.
        limit: show the N senses that changed most (null: all).
        allow_unverified: read an edit saved without ``edit_manifest.json`` (by an older version).

    Returns:
        The rows of the table.
    """
    from editing.edits import load_edited
    from editing.methods.senses.inspect import format_inspection, inspect_edit

    rows = inspect_edit(load_edited(edit, allow_unverified=allow_unverified), top=top, limit=limit)
    print(format_inspection(rows))
    return rows
