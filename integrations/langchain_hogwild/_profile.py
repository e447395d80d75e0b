"""The chat model's `profile` (langchain-core's ModelProfile) from the model's config."""

from __future__ import annotations

from typing import Any

from langchain_core.language_models import ModelProfile

# What ChatHogwild does whatever the model: text in and out, tools (with enforced tool_choice),
# grammar-constrained structured output, and the workers' transcripts as reasoning.
CAPABILITIES = ModelProfile(
    text_inputs=True,
    image_inputs=False,
    audio_inputs=False,
    video_inputs=False,
    pdf_inputs=False,
    text_outputs=True,
    image_outputs=False,
    audio_outputs=False,
    video_outputs=False,
    tool_calling=True,
    tool_choice=True,
    tool_call_streaming=True,
    structured_output=True,
    reasoning_output=True,
    temperature=True,
)


def context_size(config: Any) -> int | None:
    """The model's context window in tokens, from its (text) config."""
    config = getattr(config, "get_text_config", lambda: config)()
    size = getattr(config, "max_position_embeddings", None)
    return int(size) if size else None


def model_profile(name: str, config: Any | None, max_context: int | None = None) -> ModelProfile:
    """The capabilities, the model's name and, when the config is known, its context (bounded by
    `max_context`) as the most input and output tokens."""
    profile = ModelProfile(name=name, **CAPABILITIES)
    size = context_size(config) if config is not None else None
    if size is not None or max_context is not None:
        limit = min(x for x in (size, max_context) if x is not None)
        profile["max_input_tokens"] = limit
        profile["max_output_tokens"] = limit
    return profile
