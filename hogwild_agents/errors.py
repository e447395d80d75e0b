"""Exceptions raised by hogwild_agents, each saying what is wrong and how to fix it."""


class HogwildError(Exception):
    """Base class of the library's errors."""


class ModelLoadError(HogwildError, ValueError):
    """A model or tokenizer could not be loaded from what was given."""


class UnsupportedModelError(HogwildError, ValueError):
    """The model's architecture cannot run on a shared, position-shifted cache."""


class ContextLengthError(HogwildError, ValueError):
    """A prompt does not fit the model's context window."""


class LogitsProcessorError(HogwildError, RuntimeError):
    """A logits processor raised or returned unusable scores. Nothing was chosen in that step; the run
    stays consistent and the next `step()` tries the choice again."""


class CacheCapacityError(HogwildError, RuntimeError):
    """A run needs more KV-cache memory than the engine's cache cap allows."""


class RunCancelledError(HogwildError, RuntimeError):
    """The run was cancelled before it produced a result."""


class GrammarError(HogwildError, ValueError):
    """A schema or grammar cannot constrain output (invalid, unsupported, or a tokenizer it cannot use)."""


class EvalError(HogwildError, ValueError):
    """An evaluation's dataset, grid, checker or results database cannot be used as given."""


class InvalidArgumentError(HogwildError, ValueError):
    """An option or input value is refused: the message names it, what was given and what to pass."""
