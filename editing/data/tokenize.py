"""Tokenization with suffix masks (SPEC section 3).

Every example becomes one or two token sequences (one per suffix). Each sequence is the prefix ids followed by
the separately tokenized suffix ids; ``score_from`` is the index of the first token whose prediction is scored.
A text scores every token after the first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from editing.core.errors import DataFormatError
from editing.data.chat import ChatTemplate
from editing.data.jsonl import Record

GPT2_SEPARATOR = "<|endoftext|>"


@dataclass
class Sequence:
    """One token sequence and the tokens in it that are scored."""

    ids: list[int]
    score_from: int
    """Tokens ``ids[score_from:]`` are scored (each predicted from the position before it)."""


@dataclass
class TokenizedExample:
    """An example's sequences (one per suffix, or one for a text) and how many prefix tokens were cut."""

    index: int
    sequences: list[Sequence]
    truncated: int = 0
    is_text: bool = False

    @property
    def length(self) -> int:
        """Longest sequence length (for batching by tokens)."""
        return max(len(s.ids) for s in self.sequences)


@dataclass
class TokenizationStats:
    """Counts reported after tokenizing a file."""

    examples: int = 0
    truncated_examples: int = 0
    truncated_tokens: int = 0
    notes: list[str] = field(default_factory=list)


def strips_suffix_space(tokenizer) -> bool:
    """Whether the tokenizer adds its own word-boundary marker at the start of a string (SentencePiece style).

    For such tokenizers the reference strips spaces from both ends of the suffix (Python ``suffix.strip(' ')``),
    since tokenizing " Paris" alone would otherwise yield an extra space token. Byte-level BPE (GPT-2, GPT-NeoX,
    SmolLM2) keeps the suffix as it is.
    """
    pieces = tokenizer.convert_ids_to_tokens(tokenizer("a", add_special_tokens=False)["input_ids"])
    return bool(pieces) and pieces[0].startswith("\u2581")


class ExampleTokenizer:
    """Turns records into token sequences exactly as SPEC section 3 prescribes.

    Args:
        tokenizer: a Hugging Face tokenizer.
        max_length: the model's context; longer examples lose tokens from the start of the prefix.
        strip_suffix_space: strip spaces from both ends of a suffix (``suffix.strip(' ')``, SPEC section 3); None
            decides from the tokenizer.
        chat: ask prefixes through this chat template (``editing.data.chat``): the prefix as the user's turn, the
            suffix, without its leading spaces, as the start of the assistant's reply; texts stay bare.
    """

    def __init__(self, tokenizer, max_length: int, strip_suffix_space: bool | None = None,
                 chat: ChatTemplate | None = None) -> None:
        self.tokenizer = tokenizer
        self.chat = chat
        self.max_length = int(max_length)
        self.strip_suffix_space = strips_suffix_space(tokenizer) if strip_suffix_space is None else strip_suffix_space
        vocab = tokenizer.get_vocab()
        if GPT2_SEPARATOR in vocab:
            self.separator_id = vocab[GPT2_SEPARATOR]
        else:
            sep = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
            self.separator_id = sep

    def _encode_prefix(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def _encode_suffix(self, text: str) -> list[int]:
        if self.chat is not None:
            text = text.lstrip(" ")
        if self.strip_suffix_space:
            # only the space character, as the reference does: tabs and newlines are kept
            text = text.strip(" ")
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _encode_text(self, text: str) -> list[int]:
        if not text.startswith(GPT2_SEPARATOR):
            return self._encode_prefix(text)
        # The GPT-2 document separator: map it to this tokenizer's own separator, without doubling a BOS.
        ids = self._encode_prefix(text[len(GPT2_SEPARATOR):])
        if self.separator_id is not None and (not ids or ids[0] != self.separator_id):
            ids = [self.separator_id] + ids
        return ids

    def example(self, record: Record, path: str, stats: TokenizationStats | None = None) -> TokenizedExample:
        """Tokenize one record (prefix/suffix(es), or text).

        Args:
            record: the record.
            path: its file, for error messages.
            stats: counts to update.

        Returns:
            The tokenized example.
        """
        stats = stats if stats is not None else TokenizationStats()
        stats.examples += 1
        if record.text is not None:
            ids = self._encode_text(record.text)
            if len(ids) < 2:
                raise DataFormatError(path, record.line, "text has fewer than two tokens: nothing to score")
            cut = max(0, len(ids) - self.max_length)
            if cut:
                ids = ids[cut:]
                stats.truncated_examples += 1
                stats.truncated_tokens += cut
            return TokenizedExample(record.index, [Sequence(ids, 1)], truncated=cut, is_text=True)
        prefix = self._encode_prefix(record.prefix) if self.chat is None else self.chat.encode(record.prefix)
        suffixes = [self._encode_suffix(s) for s in record.suffixes]
        for s, ids in zip(record.suffixes, suffixes, strict=True):
            if not ids:
                raise DataFormatError(path, record.line, f"suffix {s!r} has no tokens after tokenization")
            if len(ids) >= self.max_length:
                raise DataFormatError(
                    path, record.line,
                    f"suffix alone is {len(ids)} tokens, longer than the model's context minus one "
                    f"({self.max_length - 1}); shorten the suffix or use a model with a longer context",
                )
        if not prefix:
            raise DataFormatError(
                path, record.line,
                "empty prefix and the tokenizer adds no BOS token: the first suffix token cannot be scored",
            )
        cut = max(0, len(prefix) + max(len(s) for s in suffixes) - self.max_length)
        if cut and self.chat is not None:  # cutting from the start would cut the template's head, not the question
            raise DataFormatError(
                path, record.line,
                f"the prefix in its chat template and the suffix are {cut} token(s) longer than the model's context "
                f"({self.max_length}); shorten the prefix, or set data.chat_template false",
            )
        if cut:
            prefix = prefix[cut:]
            stats.truncated_examples += 1
            stats.truncated_tokens += cut
        return TokenizedExample(record.index, [Sequence(prefix + s, len(prefix)) for s in suffixes], truncated=cut)

    def examples(self, records: list[Record], path: str) -> tuple[list[TokenizedExample], TokenizationStats]:
        """Tokenize a file's records; returns the examples and counts (truncations included)."""
        stats = TokenizationStats()
        out = [self.example(r, path, stats) for r in records]
        if stats.truncated_examples:
            stats.notes.append(
                f"{path}: {stats.truncated_examples} example(s) longer than the context ({self.max_length}); "
                f"{stats.truncated_tokens} token(s) dropped from the start of their prefix"
            )
        return out, stats
