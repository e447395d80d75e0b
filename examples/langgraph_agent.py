"""A LangChain agent on ChatHogwild: two workers of the embedded model, one real tool, one round trip.

The 135M embedded model is too small to decide on its own when to call a tool, so the first model
call forces the tool (tool_choice), and once the tool's result is in the conversation the model answers
without tools (tool_choice "none"). With a larger model (ChatHogwild(model="path/or/id")) drop the middleware.

    python examples/langgraph_agent.py
"""

from __future__ import annotations

from langchain.agents import create_agent
from langchain.agents.middleware import wrap_model_call
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import tool

from langchain_hogwild import ChatHogwild


@tool
def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return f"It is sunny and 21 degrees in {city}."


@wrap_model_call
def call_the_tool_first(request, handler):
    """Force the tool call first; once its result is in the conversation, answer from it."""
    has_result = any(isinstance(m, ToolMessage) for m in request.messages)
    return handler(request.override(tool_choice="none" if has_result else "get_weather"))


def main() -> None:
    model = ChatHogwild(n_workers=2, protocol=None, max_tokens=32)
    agent = create_agent(model, [get_weather], middleware=[call_the_tool_first])
    state = agent.invoke({"messages": [HumanMessage("What is the weather in Paris?")]})
    for message in state["messages"]:
        calls = getattr(message, "tool_calls", None)
        print(f"{message.type:>5}: {message.content or ''}{f' {calls}' if calls else ''}")


if __name__ == "__main__":
    main()
