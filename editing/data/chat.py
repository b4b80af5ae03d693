"""Canonical examples asked through a chat template: the prefix as the user's turn, the suffix as the start of the
assistant's reply (``--data.chat_template``).

A deployed chat model (SmolLM2-Instruct, Llama-2-chat) sees a question inside its template, never as bare text, so
an edit trained and scored on bare prefixes is measured on inputs the model never gets. With a template, an example
(prefix, suffix) becomes::

    render([{"role": "user", "content": prefix}], add_generation_prompt=True) + suffix

tokenized as the rendered prompt (its special tokens written out by the template, so no tokenizer-added BOS) followed
by the separately tokenized suffix, whose leading spaces are dropped: the reply starts the assistant's turn, where a
model writes "Port Louis", not " Port Louis". General texts (R, G, targeted texts) stay bare text: they are the
model's general text distribution, not conversations.
"""

from __future__ import annotations

from pathlib import Path

from editing.core.errors import ConfigError

ChatSetting = bool | str | None
"""``--data.chat_template``: false/None (bare prefixes), true (the tokenizer's own template), or a Jinja template
(its text, or the path of a file holding it) for a tokenizer that has none."""


class ChatTemplate:
    """A tokenizer's chat template, rendering a prefix as the user's turn and the start of the assistant's reply.

    Args:
        tokenizer: a Hugging Face tokenizer.
        template: the Jinja template (None: the tokenizer's own).
        source: where the template came from, for messages.
    """

    def __init__(self, tokenizer, template: str | None = None, source: str = "the tokenizer's chat_template") -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.source = source
        probe = "Xq7 probe text"
        rendered, start = self.render(probe)
        if rendered.count(probe) != 1:
            raise ConfigError(f"{source} writes the user's text {rendered.count(probe)} times; a chat template for "
                              "data.chat_template must write the user's message once")
        self.head_chars = start

    def render(self, prompt: str) -> tuple[str, int]:
        """The rendered prompt (ending where the assistant's reply begins) and where ``prompt`` starts in it.

        Raises:
            ConfigError: the template fails, or changes the user's text (so that the subject of a MEMIT request or
                the prompt itself could not be located in it).
        """
        try:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True, chat_template=self.template)
        except Exception as err:  # noqa: BLE001 - a Jinja error, reported with the template's source
            raise ConfigError(f"{self.source} cannot render a user message ({type(err).__name__}: {err}); check the "
                              "template, or set data.chat_template false") from None
        if not isinstance(text, str):
            raise ConfigError(f"{self.source} rendered {type(text).__name__}, not text; check the template")
        start = text.rfind(prompt)
        if start < 0:
            raise ConfigError(f"{self.source} changes the user's text {prompt!r} (e.g. strips or escapes it), so "
                              "the prompt cannot be found in the rendered turn; use a template that writes the "
                              "message as it is")
        return text, start

    def turn_end_ids(self) -> list[int]:
        """The special tokens the template writes after the user's text (e.g. ``<|im_end|>``): a chat model ends its
        own turn with them, so generation stops there."""
        text, start = self.render("Xq7 probe text")
        tail = text[start + len("Xq7 probe text"):]
        special = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        return [i for i in self.tokenizer(tail, add_special_tokens=False)["input_ids"] if i in special]

    def encode(self, prompt: str) -> list[int]:
        """Token ids of the rendered prompt (its special tokens are the template's; the tokenizer adds none)."""
        text, _ = self.render(prompt)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def load_chat_template(tokenizer, setting: ChatSetting, field: str = "data.chat_template") -> ChatTemplate | None:
    """The chat template ``setting`` asks for, or None for bare prefixes.

    Args:
        tokenizer: the model's tokenizer.
        setting: false/None, true (the tokenizer's own template), or a Jinja template (text or a file's path).
        field: the setting's name, for messages.

    Raises:
        ConfigError: true for a tokenizer without a template, an unreadable template file, or a template that does
            not render a user message as it is.
    """
    if setting is None or setting is False:
        return None
    if setting is True:
        if not getattr(tokenizer, "chat_template", None):
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise ConfigError(f"{field}=true, but the tokenizer of {name!r} has no chat template; set {field} false "
                              "(a base model is asked with bare text), or give a Jinja template (its text or a "
                              "file) as the setting")
        return ChatTemplate(tokenizer)
    if not isinstance(setting, str) or not setting.strip():
        raise ConfigError(f"{field}={setting!r}: expected true, false, or a Jinja chat template (text or a file)")
    if "{" not in setting:  # no Jinja markup: a file holding the template
        path = Path(setting).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{field}={setting!r}: cannot read the template file ({err}); give a readable UTF-8 "
                              "file, the template's text, or true for the tokenizer's own") from None
        return ChatTemplate(tokenizer, text, source=f"the chat template {path}")
    return ChatTemplate(tokenizer, setting, source=f"{field}")

