"""Chat messages and the model's chat template, in one place.

- Role names: `ROLES`, and `ROLE_ALIASES` for other spellings (LangChain's "human"/"ai", OpenAI's
  "developer").
- Message normalisation: role/content dicts, or objects with `.type` (or `.role`) and `.content` such
  as LangChain messages (read by attribute; this module never imports LangChain).
- Content flattening (`content_text`): a message's content as text. A content list keeps only its text
  parts, i.e. plain strings and parts whose `type` is "text"; images, tool-use blocks and other parts are
  dropped (a part with a `text` key but another type is not text the user wrote).
- Template sniffing: does the chat template render tool schemas (`renders_tools`), accept a system role
  (`accepts_system_role`), know a "<think>" reasoning section (`knows_thinking`)?
- Rendering (`render`): through the tokenizer's chat template, ending with the assistant's turn. A
  template that refuses a system role gets the system text at the start of the first user message; a
  tokenizer without a template gets a plain "Role:" layout. Rendering goes through
  `encoding.render_chat`, so message contents stay marked untrusted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from hogwild_agents.encoding import MarkedText, render_chat
from hogwild_agents.errors import InvalidArgumentError

ROLES = ("system", "user", "assistant", "tool")
ROLE_ALIASES = {"human": "user", "ai": "assistant", "developer": "system"}
THINK = "<think>"

Messages = str | Sequence[Any]


# ---- messages ---------------------------------------------------------------------------------


def role_name(role: Any) -> str:
    """The role called `role` (an alias resolved); a clear error for an unknown one."""
    resolved = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
    if resolved not in ROLES:
        known = ", ".join([*ROLES, *ROLE_ALIASES])
        raise InvalidArgumentError(f"Unknown message role {role!r}; expected one of {known}.")
    return resolved


def content_text(content: Any) -> str:
    """The text of a message's content: a string as is, None as "", a content list (or one part) as
    its text parts joined: plain strings and parts with `type == "text"`; other parts are dropped."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, Mapping):
        content = [content]
    if isinstance(content, Iterable):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping) and part.get("type") == "text":
                parts.append(str(part.get("text") or ""))
        return "".join(parts)
    return str(content)


def normalize_message(message: Any) -> dict[str, Any]:
    """One message as a dict with a known `role` and text `content` (other keys of a dict are kept).
    Objects are read by their `role` (else `type`) and `content` attributes."""
    if isinstance(message, Mapping):
        message = dict(message)
    elif hasattr(message, "content"):
        role = getattr(message, "role", None) or getattr(message, "type", None)
        message = {"role": role, "content": message.content}
    else:
        raise InvalidArgumentError(
            f"A chat message must be a dict with 'role' and 'content' (or a message object), got "
            f"{type(message).__name__}."
        )
    return {
        **message,
        "role": role_name(message.get("role")),
        "content": content_text(message.get("content")),
    }


def normalize_messages(messages: Messages, *, merge: bool = True) -> list[dict[str, Any]]:
    """Chat messages as role/content dicts (a string is one user message). With `merge`, runs of
    messages with the same role become one, their texts joined by a blank line."""
    items = [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)
    if not items:
        raise InvalidArgumentError("The message list is empty; give at least one message.")
    result: list[dict[str, Any]] = []
    for message in map(normalize_message, items):
        if merge and result and result[-1]["role"] == message["role"]:
            result[-1]["content"] += "\n\n" + message["content"]
        else:
            result.append(message)
    return result


def with_system_text(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """Add `text` to the leading system message (or open the conversation with one)."""
    if not text:
        return messages
    if messages and messages[0]["role"] == "system":
        first = dict(messages[0])
        first["content"] = f"{first['content']}\n\n{text}" if first["content"] else text
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def system_into_user(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """For chat templates without a system role: the leading system text opens the first user message
    (or becomes one)."""
    if not messages or messages[0]["role"] != "system":
        return [dict(m) for m in messages]
    system, rest = messages[0]["content"], [dict(m) for m in messages[1:]]
    if rest and rest[0]["role"] == "user":
        rest[0]["content"] = f"{system}\n\n{rest[0]['content']}"
        return rest
    return [{"role": "user", "content": system}, *rest]


# ---- the chat template ------------------------------------------------------------------------


def template_text(tokenizer: Any) -> str:
    """The tokenizer's chat template ("" when it has none; named templates joined)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, Mapping):
        return "\n".join(str(t) for t in template.values())
    return template if isinstance(template, str) else ""


def renders_tools(tokenizer: Any) -> bool:
    """True when the chat template renders tool schemas and tool calls itself."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, Mapping):
        template = template.get("tool_use") or template.get("default")
    return isinstance(template, str) and "tools" in template and "tool_call" in template


def knows_thinking(tokenizer: Any) -> bool:
    """True when the chat template mentions a "<think>" reasoning section."""
    return THINK in template_text(tokenizer)


def accepts_system_role(tokenizer: Any) -> bool:
    """True when the chat template renders a system message (False: it raises on one, or there is no
    template, where the plain layout is used instead)."""
    if not template_text(tokenizer):
        return False
    try:
        _apply(tokenizer, [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])
    except Exception:  # a template refuses a role by raising whatever it likes
        return False
    return True


def plain_chat(messages: Sequence[Mapping[str, Any]]) -> str:
    """A minimal chat layout for tokenizers without a chat template."""
    turns = "".join(f"{m['role'].capitalize()}:\n{m['content']}\n\n" for m in messages)
    return turns + "Assistant:\n"


def _apply(tokenizer: Any, messages: list[dict[str, Any]], **kwargs: Any) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)


def _template_renderer(tokenizer: Any, **kwargs: Any) -> Callable[[list[dict[str, Any]]], str]:
    def render_messages(messages: list[dict[str, Any]]) -> str:
        try:
            return _apply(tokenizer, messages, **kwargs)
        except Exception:
            if not messages or messages[0]["role"] != "system" or accepts_system_role(tokenizer):
                raise
        return _apply(tokenizer, system_into_user(messages), **kwargs)

    return render_messages


def render(
    tokenizer: Any,
    messages: Messages,
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    **template_kwargs: Any,
) -> MarkedText:
    """`messages` rendered through the tokenizer's chat template, ending with the assistant's turn; the
    contents of user, assistant and tool messages are marked untrusted (`encoding.render_chat`).

    Messages are normalised (`normalize_message`, not merged). `tools` (OpenAI-format schemas) go to
    the template, which may render them or not (see `renders_tools`); `template_kwargs` too (e.g.
    `enable_thinking`). A template that refuses a system role gets the system text in the first user
    message; a tokenizer without a template (or None) gets `plain_chat`, without tools.
    """
    chat = normalize_messages(messages, merge=False)
    if not template_text(tokenizer):
        return render_chat(plain_chat, chat)
    if tools:
        template_kwargs["tools"] = [dict(tool) for tool in tools]
    return render_chat(_template_renderer(tokenizer, **template_kwargs), chat)
