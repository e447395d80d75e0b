"""The core works without LangChain (an optional extra): imports, the CLI, engine tools from functions."""

from __future__ import annotations

import subprocess
import sys
import textwrap

WITHOUT_LANGCHAIN = textwrap.dedent(
    """
    import sys

    class NoLangChain:
        def find_spec(self, name, path=None, target=None):
            top = name.split(".")[0]
            if top.startswith(("langchain", "langgraph")) and top != "langchain_hogwild":
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, NoLangChain())

    import hogwild_agents
    import hogwild_agents.cli
    import hogwild_agents.engine
    from hogwild_agents import EngineTool

    def add(a: int, b: int = 2) -> int:
        '''Add two numbers.

        Args:
            a: the first number
        '''
        return a + b

    tool = EngineTool.from_any(add)
    assert tool.name == "add" and tool.description == "Add two numbers.", tool
    assert tool.parameters == {
        "type": "object",
        "properties": {
            "a": {"type": "integer", "description": "the first number"},
            "b": {"type": "integer", "default": 2},
        },
        "required": ["a"],
    }, tool.parameters
    assert tool.func(a=1) == 3
    assert not [name for name in sys.modules if name.startswith(("langchain", "langgraph"))]
    try:
        import langchain_hogwild
    except ImportError as error:
        assert "hogwild-agents[langchain]" in str(error), error
    else:
        raise AssertionError("langchain_hogwild imported without langchain-core")
    print("ok")
    """
)


def test_the_core_and_the_cli_import_without_langchain():
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_LANGCHAIN], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok"
