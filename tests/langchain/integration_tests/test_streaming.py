"""Streaming under a protocol: the workers' writing arrives as it happens, as reasoning content blocks,
then the answer; inside a LangGraph node the worker events reach the graph's custom stream."""

from __future__ import annotations

import asyncio

from langchain_core.messages import AIMessageChunk
from langgraph.graph import START, MessagesState, StateGraph

from langchain_hogwild import TOKEN_EVENT, ChatHogwild

PROTOCOL = {"n_workers": 2, "protocol": "collaborate", "max_tokens": 12}


def reasoning_blocks(chunk: AIMessageChunk) -> list[dict]:
    content = chunk.content if isinstance(chunk.content, list) else []
    return [b for b in content if isinstance(b, dict) and b.get("type") == "reasoning"]


def test_protocol_streams_each_workers_writing_then_the_answer() -> None:
    model = ChatHogwild(**PROTOCOL)
    chunks = list(model.stream("What is 2 + 3?"))
    with_reasoning = [c for c in chunks if reasoning_blocks(c)]
    assert len(with_reasoning) >= 10  # token by token, not one chunk at the end
    workers = {b["index"] for c in with_reasoning for b in reasoning_blocks(c)}
    assert workers == {0, 1}
    names = {b["extras"]["name"] for c in with_reasoning for b in reasoning_blocks(c)}
    assert names == {"Alice", "Bob"}
    full = chunks[0]
    for chunk in chunks[1:]:
        full += chunk
    merged = reasoning_blocks(full)
    assert [b["index"] for b in merged] == [0, 1]  # one block per worker: its whole transcript
    transcripts = [w["text"] for w in full.response_metadata["workers"]]
    for block, text in zip(merged, transcripts, strict=True):
        assert block["reasoning"] == text
    assert full.text == model.invoke("What is 2 + 3?").content  # the answer, as invoke returns it
    assert chunks.index(with_reasoning[-1]) < len(chunks) - 1  # the answer comes after the reasoning


def test_worker_events_reach_a_graphs_custom_and_messages_streams() -> None:
    model = ChatHogwild(**PROTOCOL)

    def answer(state: MessagesState) -> dict:
        return {"messages": [model.invoke(state["messages"])]}

    graph = StateGraph(MessagesState).add_node("answer", answer).add_edge(START, "answer").compile()
    custom = list(graph.stream({"messages": [("user", "What is 2 + 3?")]}, stream_mode="custom"))
    assert custom and all(event["event"] == TOKEN_EVENT for event in custom)
    assert {event["name"] for event in custom if event["worker"] is not None} == {"Alice", "Bob"}
    messages = list(graph.stream({"messages": [("user", "What is 2 + 3?")]}, stream_mode="messages"))
    assert sum(1 for chunk, _ in messages if reasoning_blocks(chunk)) >= 10


def test_async_graph_custom_stream() -> None:
    model = ChatHogwild(**PROTOCOL)

    async def answer(state: MessagesState) -> dict:
        return {"messages": [await model.ainvoke(state["messages"])]}

    graph = StateGraph(MessagesState).add_node("answer", answer).add_edge(START, "answer").compile()

    async def collect() -> list:
        return [e async for e in graph.astream({"messages": [("user", "Hi")]}, stream_mode="custom")]

    custom = asyncio.run(collect())
    assert custom and {e["source"] for e in custom} >= {"sampled"}
