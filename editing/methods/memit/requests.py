"""MEMIT requests from canonical examples: prompt, subject span, suffixes; context templates; tokenized rows."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from torch import nn

from editing.core.errors import ConfigError, DataFormatError
from editing.data.chat import ChatTemplate
from editing.data.jsonl import Record
from editing.data.tokenize import ExampleTokenizer
from editing.methods.memit.config import ORACLE_DEFAULTS, MEMITConfig

log = logging.getLogger(__name__)

# First words of the generated context templates (greedy continuations, so the templates are deterministic).
TEMPLATE_STARTS = ("The", "Therefore", "Because", "I", "You", "It", "In", "A", "This", "When")


@dataclass(frozen=True)
class Request:
    """One edit request: a prompt (the canonical prefix), the subject's character span in it, and the suffixes."""

    prefix: str
    suffixes: tuple[str, ...]
    span: tuple[int, int]
    """Character span [start, end) of the subject in ``prefix``."""

    @property
    def subject(self) -> str:
        """The subject text."""
        return self.prefix[self.span[0]: self.span[1]]


def oracle_rule(cfg: MEMITConfig, task_name: str) -> tuple[str, str]:
    """``("field", name)`` or ``("pattern", regex)`` locating the oracle subject, from the settings or the task."""
    if cfg.oracle_field is not None:
        return "field", cfg.oracle_field
    if cfg.oracle_pattern is not None:
        return "pattern", cfg.oracle_pattern
    default = ORACLE_DEFAULTS.get(task_name)
    if default is None:
        group = cfg.section
        raise ConfigError(f"{group}.supervision='oracle' needs the subject span of task {task_name!r}: set "
                          f"{group}.oracle_field (a field of each canonical line that occurs in its prefix) or "
                          f"{group}.oracle_pattern (a regular expression whose first group is the subject)")
    kind, value = next(iter(default.items()))
    return kind, value


def build_requests(records: list[Record], cfg: MEMITConfig, task_name: str, path: str) -> list[Request]:
    """Requests from canonical records under ``cfg.supervision``.

    Args:
        records: the canonical examples (with all their fields).
        cfg: MEMIT settings (supervision, oracle field or pattern).
        task_name: the task (for the default oracle rule).
        path: the canonical file, for error messages.

    Returns:
        One request per record, in file order.
    """
    requests = []
    rule = oracle_rule(cfg, task_name) if cfg.supervision == "oracle" else None
    compiled = None
    if rule is not None and rule[0] == "pattern":
        try:
            compiled = re.compile(rule[1])
        except re.error as err:
            raise ConfigError(f"memit.oracle_pattern={rule[1]!r} is not a valid regular expression: {err}") from err
    not_found: list[int] = []
    for record in records:
        prefix = record.prefix
        if rule is None:
            span = (0, len(prefix.rstrip()))
        elif compiled is None:
            value = (record.fields or {}).get(rule[1])
            if not isinstance(value, str) or not value:
                raise DataFormatError(path, record.line, f"oracle supervision needs a string field {rule[1]!r} "
                                                         "(memit.oracle_field); this line has none")
            start = prefix.lower().rfind(value.lower())  # case-insensitive: "the Democratic Republic of Congo"
            if start < 0:
                # A few lines of the source data put the entity in the suffix ("The capital of" + " Algeria is
                # Alger"); those keep the whole prefix as their subject, as under standard supervision.
                not_found.append(record.line)
                span = (0, len(prefix.rstrip()))
            else:
                span = (start, start + len(value))
        else:
            match = compiled.search(prefix)
            if match is None:
                raise DataFormatError(path, record.line, f"memit.oracle_pattern {rule[1]!r} does not match the "
                                                         f"prefix {prefix!r}")
            group = 1 if compiled.groups else 0
            span = match.span(group)
        if span[1] <= span[0]:
            raise DataFormatError(path, record.line, f"empty subject in prefix {prefix!r}")
        requests.append(Request(prefix, tuple(record.suffixes), span))
    if not_found and len(not_found) == len(records):
        raise DataFormatError(path, None, f"the oracle subject field {rule[1]!r} occurs in no prefix; set "
                                          "memit.oracle_field to a field that names the subject in the prefix")
    if not_found:
        log.warning("%s: the oracle subject (field %r) is not in the prefix on %d line(s) (e.g. line %d); those "
                    "requests use the whole prefix as their subject", path, rule[1], len(not_found), not_found[0])
    return requests


@torch.no_grad()
def context_templates(model: nn.Module, tokenizer, count: int, length: int) -> list[str]:
    """The bare template ``""`` plus ``count`` greedy continuations of fixed first words, each followed by ". ".

    Greedy decoding from fixed words keeps the templates identical from run to run.
    """
    if count > len(TEMPLATE_STARTS):
        raise ConfigError(f"memit.context_templates={count}: at most {len(TEMPLATE_STARTS)} generated templates")
    device = next(model.parameters()).device
    templates = [""]
    for word in TEMPLATE_STARTS[:count]:
        ids = torch.tensor([tokenizer(word)["input_ids"]], device=device)
        for _ in range(length):
            logits = model(input_ids=ids, use_cache=False).logits[0, -1]
            ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
        text = tokenizer.decode(ids[0], skip_special_tokens=True)
        text = " ".join(text.replace("{", " ").replace("}", " ").split())
        templates.append(f"{text}. ")
    return templates


@dataclass
class Row:
    """One tokenized sequence: a template + prompt (+ one suffix), and where the subject's last token is."""

    request: int
    template: int
    slot: int
    """Suffix index, or -1 for a prompt without suffix."""
    ids: list[int]
    score_from: int
    """Tokens ``ids[score_from:]`` (the suffix) are scored."""
    subject_pos: int


class RowBuilder:
    """Tokenizes prompts exactly as the task data is (SPEC section 3) and finds the subject's last token.

    With a chat template (``--data.chat_template``) a prompt (context template + prefix) is the user's turn, as the
    task data's prefixes are; the "<subject> is a" prompts of the KL term stay bare text.
    """

    def __init__(self, tokenizer, max_length: int, chat: ChatTemplate | None = None) -> None:
        self.tokenizer = tokenizer
        self.chat = chat
        self.examples = ExampleTokenizer(tokenizer, max_length, chat=chat)

    def _subject_pos(self, text: str, end: int, ids: list[int], special: bool = True) -> int:
        enc = self.tokenizer(text, return_offsets_mapping=True, add_special_tokens=special)
        if list(enc["input_ids"]) != ids:
            raise RuntimeError("tokenizing with offsets gave different ids; MEMIT needs a fast tokenizer")
        positions = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < end]
        if not positions:
            raise ConfigError(f"cannot locate the subject in {text!r}")
        return positions[-1]

    def rows(self, requests: list[Request], templates: list[str], with_suffixes: bool) -> list[Row]:
        """Rows for every (request, template[, suffix])."""
        out = []
        for r, req in enumerate(requests):
            for t, template in enumerate(templates):
                text = template + req.prefix
                record = Record(0, 0, prefix=text, suffixes=req.suffixes)
                example = self.examples.example(record, "<memit request>")
                if example.truncated:
                    raise ConfigError(f"MEMIT prompt {text!r} is longer than the model's context")
                seq0 = example.sequences[0]
                if self.chat is None:
                    pos = self._subject_pos(text, len(template) + req.span[1], seq0.ids[: seq0.score_from])
                else:  # the prompt is the user's turn: the subject sits after the template's head
                    rendered, start = self.chat.render(text)
                    pos = self._subject_pos(rendered, start + len(template) + req.span[1],
                                            seq0.ids[: seq0.score_from], special=False)
                if not with_suffixes:
                    out.append(Row(r, t, -1, seq0.ids[: seq0.score_from], seq0.score_from, pos))
                    continue
                for slot, seq in enumerate(example.sequences):
                    out.append(Row(r, t, slot, seq.ids, seq.score_from, pos))
        return out

    def kl_rows(self, requests: list[Request]) -> list[Row]:
        """One "<subject> is a" prompt per request (SPEC section 10), with the subject's last token."""
        out = []
        for r, req in enumerate(requests):
            text = f"{req.subject} is a"
            ids = list(self.tokenizer(text)["input_ids"])
            out.append(Row(r, 0, -1, ids, len(ids), self._subject_pos(text, len(req.subject), ids)))
        return out


def pad_rows(rows: list[Row], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` of the rows."""
    length = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row.ids)] = torch.tensor(row.ids)
        mask[i, : len(row.ids)] = 1
    return ids.to(device), mask.to(device)
