"""hogwild_agents: several workers of one LLM generating in parallel over one shared KV cache."""

from hogwild_agents.engine import HogwildEngine
from hogwild_agents.errors import (
    ContextLengthError,
    GrammarError,
    HogwildError,
    InvalidArgumentError,
    LogitsProcessorError,
    ModelLoadError,
    UnsupportedModelError,
)
from hogwild_agents.hooks import EngineTool, Hooks, ToolCall
from hogwild_agents.protocol import Protocol, ProtocolError
from hogwild_agents.results import HogwildResult, StepRecord, Usage, WorkerResult
from hogwild_agents.run import HogwildRun
from hogwild_agents.script import RunScript
from hogwild_agents.views import LAYOUTS, Layout

__all__ = [
    "LAYOUTS",
    "ContextLengthError",
    "EngineTool",
    "GrammarError",
    "HogwildEngine",
    "HogwildError",
    "HogwildResult",
    "HogwildRun",
    "Hooks",
    "InvalidArgumentError",
    "Layout",
    "LogitsProcessorError",
    "ModelLoadError",
    "Protocol",
    "ProtocolError",
    "RunScript",
    "StepRecord",
    "ToolCall",
    "UnsupportedModelError",
    "Usage",
    "WorkerResult",
]
