"""Text into token ids, keeping untrusted text from forging control tokens.

The engine's own text (chat-template markers, protocol headers, step headers) is encoded with the
tokenizer's special tokens parsed, so "<|im_end|>" in it is the end-of-turn token. Untrusted text
(message contents, tool output, text given to `inject`/`force`) is encoded with special tokens split,
so the same characters in it stay plain text. `MarkedText` is a str that carries its untrusted spans
(a prompt rendered through a chat template); `TextEncoder.encode` honours them. Text whose untrusted
parts hold no special-token text encodes exactly as the tokenizer encodes it whole.
"""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from hogwild_agents import validation

Span = tuple[int, int]
UNTRUSTED_ROLES = ("user", "assistant", "tool")  # whose message contents are untrusted in a prompt


class MarkedText(str):
    """A str whose `untrusted` character spans (start, end) hold untrusted text. `+` keeps the spans;
    other str operations return plain strs."""

    untrusted: tuple[Span, ...]

    def __new__(cls, text: str, untrusted: Iterable[Span] = ()) -> MarkedText:
        marked = super().__new__(cls, text)
        marked.untrusted = _normalized(untrusted, len(text))
        return marked

    def __reduce__(self) -> tuple[Any, ...]:
        return MarkedText, (str(self), self.untrusted)

    @classmethod
    def join(cls, pieces: Iterable[tuple[str, bool]]) -> MarkedText:
        """Concatenate (text, trusted) pieces."""
        text, spans, position = [], [], 0
        for piece, trusted in pieces:
            if not trusted and piece:
                spans.append((position, position + len(piece)))
            text.append(piece)
            position += len(piece)
        return cls("".join(text), spans)

    def pieces(self) -> list[tuple[str, bool]]:
        """The text as (text, trusted) pieces, in order."""
        result, position = [], 0
        for start, end in self.untrusted:
            if start > position:
                result.append((str.__getitem__(self, slice(position, start)), True))
            result.append((str.__getitem__(self, slice(start, end)), False))
            position = end
        if position < len(self):
            result.append((str.__getitem__(self, slice(position, None)), True))
        return result

    def rebase(self, text: str) -> MarkedText:
        """`text` (an edit of this text) with the spans that lie in the prefix both share."""
        shared = next((i for i, (a, b) in enumerate(zip(self, text, strict=False)) if a != b), None)
        shared = min(len(self), len(text)) if shared is None else shared
        return MarkedText(text, [(s, min(e, shared)) for s, e in self.untrusted if s < shared])

    def __add__(self, other: str) -> MarkedText:
        if not isinstance(other, str):
            return NotImplemented
        shifted = [(s + len(self), e + len(self)) for s, e in getattr(other, "untrusted", ())]
        return MarkedText(str(self) + str(other), [*self.untrusted, *shifted])

    def __radd__(self, other: str) -> MarkedText:
        if not isinstance(other, str):
            return NotImplemented
        return MarkedText(other + str(self), [(s + len(other), e + len(other)) for s, e in self.untrusted])


def _normalized(spans: Iterable[Span], length: int) -> tuple[Span, ...]:
    """Spans clipped to the text, sorted, with overlapping or touching spans merged."""
    merged: list[list[int]] = []
    for start, end in sorted((max(0, s), min(length, e)) for s, e in spans):
        if start >= end:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return tuple((s, e) for s, e in merged)


class TextEncoder:
    """Encodes text with one tokenizer; untrusted text never yields special-token ids."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        # a fast tokenizer keeps "split special tokens" as a setting of the tokenizer object while it
        # encodes: two threads encoding at once (the scheduler and a caller) must not interleave
        self._lock = threading.Lock()
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        specials = {token.content for token in added.values() if getattr(token, "special", False)}
        specials.update(getattr(tokenizer, "all_special_tokens", ()) or ())
        specials.discard("")
        self.special_ids = {text: tokenizer.convert_tokens_to_ids(text) for text in specials}
        ordered = sorted(specials, key=len, reverse=True)  # the longest marker wins where two overlap
        self.pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def has_special_text(self, text: str) -> bool:
        return self.pattern is not None and self.pattern.search(text) is not None

    def encode(self, text: str, trusted: bool = True) -> list[int]:
        """Token ids of `text` (no BOS/EOS added). With `trusted=False`, or in a MarkedText's untrusted
        spans, special-token text is encoded as plain text."""
        validation.text(text, "The text to encode")
        if not text:
            return []
        pieces = text.pieces() if isinstance(text, MarkedText) and trusted else [(text, trusted)]
        if not any(not ok and self.has_special_text(piece) for piece, ok in pieces):
            return self._encode(str(text), split=False)  # what the tokenizer gives for the whole text
        ids: list[int] = []
        plain: list[str] = []  # text since the last trusted marker, encoded in one go
        for piece, ok in pieces:
            position = 0
            for match in self.pattern.finditer(piece) if ok else ():
                plain.append(piece[position : match.start()])
                ids += self._encode("".join(plain), split=True)
                ids.append(self.special_ids[match.group()])
                plain, position = [], match.end()
            plain.append(piece[position:])
        return ids + self._encode("".join(plain), split=True)

    def _encode(self, text: str, split: bool) -> list[int]:
        if not text:
            return []
        with self._lock:
            return self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=split)


def render_chat(render: Callable[[list[dict[str, Any]]], str], messages: Sequence[Any]) -> MarkedText:
    """`render(messages)` (a chat template) with the contents of user, assistant and tool messages
    marked untrusted.

    The messages are rendered a second time with a unique placeholder for each content, which locates
    the contents in the text exactly. When a template rewrites contents (so the placeholders do not
    map back onto the text), each content is located by searching for it in order instead."""
    text = render(list(messages))
    contents = {
        i: m["content"]
        for i, m in enumerate(messages)
        if isinstance(m, Mapping) and m.get("role") in UNTRUSTED_ROLES and isinstance(m.get("content"), str)
        if m["content"]
    }
    if not contents:
        return MarkedText(text)
    tag = f"HWUNTRUSTED{uuid.uuid4().hex}N"
    tags = {f"{tag}{i}Z": content for i, content in contents.items()}
    placeheld = [{**m, "content": f"{tag}{i}Z"} if i in contents else m for i, m in enumerate(messages)]
    try:
        skeleton = render(placeheld)
    except Exception:  # a template that inspects contents may refuse the placeholders
        skeleton = None
    spans = _spans_from_skeleton(skeleton, tags, text) if skeleton is not None else None
    if spans is None:
        spans = _spans_by_search(text, contents.values())
    return MarkedText(text, spans)


def _spans_from_skeleton(skeleton: str, tags: Mapping[str, str], text: str) -> list[Span] | None:
    parts = re.split("(" + "|".join(map(re.escape, tags)) + ")", skeleton)
    rebuilt, spans, position = [], [], 0
    for i, part in enumerate(parts):
        piece = tags[part] if i % 2 else part
        if i % 2:
            spans.append((position, position + len(piece)))
        rebuilt.append(piece)
        position += len(piece)
    return spans if "".join(rebuilt) == text else None


def _spans_by_search(text: str, contents: Iterable[str]) -> list[Span]:
    spans, position = [], 0
    for content in contents:
        found = text.find(content, position)
        if found < 0:
            found = text.find(content.strip(), position)
            content = content.strip()
        if found >= 0 and content:
            spans.append((found, found + len(content)))
            position = found + len(content)
    return spans
