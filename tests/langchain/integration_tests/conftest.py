"""Integration tests run ChatHogwild on the embedded SmolLM2-135M-Instruct, loaded once per session."""

from __future__ import annotations

import pytest

from langchain_hogwild import _registry


@pytest.fixture(scope="session", autouse=True)
def shared_smol_engine(smol_engine):
    """Every ChatHogwild() with default model settings uses the session's engine."""
    _registry.register_engine(smol_engine, None, None, None)
    yield smol_engine
    _registry.clear()
