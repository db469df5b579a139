# Chat templates: the tokenizer's Jinja template (tokenizer_config.json), a file, or a plain default, sandboxed.
"""Messages become one prompt string the way Hugging Face ``apply_chat_template`` does it: the template is
Jinja2, rendered in an immutable sandbox with ``trim_blocks`` and ``lstrip_blocks``, given ``messages``,
``add_generation_prompt``, ``bos_token`` and ``eos_token``, and ``raise_exception`` for templates that
refuse a conversation. Models without a template (pipeloom's byte-level models) get :data:`DEFAULT_TEMPLATE`::

    system: You are terse.
    user: hi
    assistant:
"""

from __future__ import annotations

import json
import os

from .errors import bad_request

DEFAULT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _token_text(value) -> str:
    """tokenizer_config.json writes special tokens as strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return value if isinstance(value, str) else ""


class ChatTemplate:
    """A compiled chat template (``source``: Jinja text) with the special tokens it may use."""

    def __init__(self, source: str = DEFAULT_TEMPLATE, *, bos_token: str = "", eos_token: str = "",
                 origin: str = "default"):
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            self.template = env.from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as err:
            raise ValueError(f"chat template from {origin} does not compile: {err}") from err
        self.source, self.origin = source, origin
        self.bos_token, self.eos_token = bos_token, eos_token

    @classmethod
    def for_model(cls, model: str | None = None, path: str | None = None) -> ChatTemplate:
        """``path`` (a Jinja file) if given; else the ``chat_template`` in ``model``'s tokenizer_config.json (a
        Hugging Face folder or a directory beside the checkpoint); else the plain default."""
        if path is not None:
            if not os.path.isfile(path):
                raise ValueError(f"server.chat_template={path!r} is not a file; give a Jinja template file")
            with open(path) as f:
                return cls(f.read(), origin=path)
        config = os.path.join(model, "tokenizer_config.json") if model and os.path.isdir(model) else None
        if config and os.path.isfile(config):
            with open(config) as f:
                spec = json.load(f)
            source = spec.get("chat_template")
            if isinstance(source, list):  # [{"name": "default", "template": ...}, ...]
                named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
                source = named.get("default") or next(iter(named.values()), None)
            if isinstance(source, str) and source:
                return cls(source, bos_token=_token_text(spec.get("bos_token")),
                           eos_token=_token_text(spec.get("eos_token")), origin=config)
        return cls()

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt for ``messages`` (dicts with role and content); a template error is a 400."""
        import jinja2

        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        except jinja2.exceptions.TemplateError as err:
            raise bad_request(f"the chat template ({self.origin}) refused these messages: {err}",
                              param="messages") from err
