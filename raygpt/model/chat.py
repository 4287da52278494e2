"""The chat template: how raygpt's chat endpoint turns messages into a prompt, and the
same template as Jinja for a Hugging Face export (`tokenizer_config.json`'s
`chat_template`, what transformers' `apply_chat_template` and vLLM render).

It lives beside the model files (not in serving) because the export writes it."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from raygpt.errors import UserError

CHAT_TEMPLATE_FILE = "chat_template.json"
ROLES = ("system", "user", "assistant", "tool")  # "developer" renders as "system"


def _text(m) -> str:
    """A message's text: a ChatMessage (`.text()`) or an OpenAI-style dict (content a string,
    None/missing, or a list of {"type": "text", "text": ...} parts joined with nothing)."""
    if not isinstance(m, dict):
        return m.text()
    c = m.get("content")
    if isinstance(c, list):
        return "".join(p.get("text") or "" if isinstance(p, dict) else str(p) for p in c)
    return c or ""


def _role(m) -> str:
    return m["role"] if isinstance(m, dict) else m.role


def _lit(s: str) -> str:
    """A Jinja string literal for s, ASCII only. Jinja unescapes string literals with
    Python's unicode-escape codec, the exact inverse of the encoding here."""
    return "'" + s.encode("unicode_escape").decode("ascii").replace("'", "\\'") + "'"


@dataclass
class ChatTemplate:
    """A plain-text chat template for base models (no special tokens needed).

    Default (documented in docs/serving.md):
        <system text>\\n\\n            (system/developer messages, if any)
        User: <text>\\n
        Assistant: <text>\\n
        ...
        Assistant:                    (the model continues from here)
    with "\\nUser:" as an extra stop string so the model does not speak for the user.
    A model directory may replace it with chat_template.json holding the same keys.
    """

    system: str = "{content}\n\n"
    user: str = "User: {content}\n"
    assistant: str = "Assistant: {content}\n"
    tool: str = "Tool: {content}\n"
    generation_prompt: str = "Assistant:"
    stop: list[str] = field(default_factory=lambda: ["\nUser:"])

    @classmethod
    def load(cls, model_dir: str, override: str | None = None) -> "ChatTemplate":
        path = Path(override) if override else Path(model_dir) / CHAT_TEMPLATE_FILE
        if not path.is_file():
            if override:
                raise UserError(f"chat_template {override!r}: no such file")
            return cls()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            t = cls(**data)
        except (ValueError, TypeError) as e:
            raise UserError(f"{path}: not a chat template ({e}); keys: system, user, assistant, "
                            "tool, generation_prompt, stop") from None
        return t

    def render(self, messages) -> str:
        """messages: ChatMessage objects (the chat endpoint) or OpenAI-style dicts."""
        out = []
        for m in messages:
            role = _role(m)
            role = "system" if role == "developer" else role
            out.append(getattr(self, role).replace("{content}", _text(m)))
        return "".join(out) + self.generation_prompt

    def to_dict(self) -> dict:
        return asdict(self)

    def to_jinja(self) -> str:
        """The same template as a Hugging Face chat template: for any messages,
        `apply_chat_template(messages, tokenize=False, add_generation_prompt=True)` equals
        `render(messages)`. Content may be a string, missing/None, or a list of text parts
        (joined with nothing, as raygpt does); the loop over `message['content']` also makes
        vLLM detect the "openai" content format, so vLLM passes parts through instead of
        joining them with newlines. Another role is an error (raygpt answers 400)."""
        content = ("{%- if message['content'] is string -%}{{ message['content'] }}"
                   "{%- elif message['content'] is defined and message['content'] is not none -%}"
                   "{%- for part in message['content'] -%}"
                   "{%- if part is string -%}{{ part }}"
                   "{%- elif part is mapping and part['text'] is string -%}{{ part['text'] }}"
                   "{%- endif -%}{%- endfor -%}{%- endif -%}")
        lines = ["{%- for message in messages -%}",
                 "{%- set role = 'system' if message['role'] == 'developer' else message['role'] -%}"]
        for i, role in enumerate(ROLES):
            pieces = getattr(self, role).split("{content}")
            body = content.join("{{ %s }}" % _lit(p) if p else "" for p in pieces)
            lines.append("{%%- %s role == %s -%%}%s" % ("if" if i == 0 else "elif", _lit(role), body))
        lines += ["{%- else -%}{{ raise_exception('unknown message role: ' ~ message['role']) }}",
                  "{%- endif -%}",
                  "{%- endfor -%}",
                  "{%%- if add_generation_prompt -%%}{{ %s }}{%%- endif -%%}" % _lit(self.generation_prompt)]
        return "\n".join(lines)
