"""``editing export``: a saved edit merged into its base model, written as a plain transformers model folder."""

from __future__ import annotations

from pathlib import Path


def export(edit: str, merged: str, overwrite: bool = False, allow_unverified: bool = False) -> Path:
    """Write an edit merged into its base model as a plain transformers folder (model.safetensors, config.json,
    the tokenizer, generation_config.json) that AutoModelForCausalLM.from_pretrained(FOLDER) loads without
    canonical-editing, computing what `editing apply --edit` computes. For edits that change weights (full, lora,
    memit, and any method registered with a merge); sense edits and codebooks are refused with the reason. The
    weights are written in fp32, also for a base read from a GGUF file (the embedded SmolLM2 included): the
    dequantized weights, not the quantized file. Example: editing export --edit runs/fit/version_0/edits/ball_1e-04
    --merged shipped/my-model

    Args:
        edit: the edit folder (``<run>/edits/ball_<eps>``).
        merged: the model folder to write; an existing one is refused unless --overwrite true.
        overwrite: replace an existing folder (it is replaced whole, never partly written).
        allow_unverified: export an edit saved without a manifest by an older version (its kind guessed from its
            file names).

    Returns:
        The folder written (also printed).
    """
    from editing.edits.export import export_merged

    folder = export_merged(edit, merged, overwrite=overwrite, allow_unverified=allow_unverified)
    print(folder)
    return folder
