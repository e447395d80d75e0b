"""In-engine tools: a call from any worker runs once and its result enters every worker's view."""

from __future__ import annotations

import asyncio
import concurrent.futures as futures
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from langchain_core.tools import tool

from hogwild_agents import LAYOUTS
from hogwild_agents.builtin_tools import calculator_tool, document_search_tool, evaluate_arithmetic
from hogwild_agents.hooks import EngineTool, Hooks, ToolRunner, stringify
from hogwild_agents.reference import view_kv_logits
from hogwild_agents.tool_calls import CLOSE, OPEN, find_tool_call, find_tool_calls, open_call_body
from tests.conftest import named_script
from tests.test_equivalence import PROMPT, assert_logits_close


def call_text(name: str, **arguments) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def run_until_result(run, worker: int, max_steps: int = 10) -> list[int]:
    """Step (checking every worker against its materialised view) until the worker's call has a result
    block in the shared history; return the shared token ids at that point."""
    for _ in range(max_steps):
        call = run.workers[worker].waiting
        if call is not None and call.future is not None:  # let the tool finish (or time out) first
            futures.wait([call.future], timeout=run.tool_runner.timeout_s + 0.1)
        run.poll_tools()  # what step() does first; done here so the references see the same views
        expected = {w.index: view_kv_logits(run, w.index) for w in run.workers if w.pending}
        record = run.step()
        for w, reference in expected.items():
            if w in record.logits:
                assert_logits_close(record.logits[w], reference)
        if run.workers[worker].waiting is None and any(e.kind == "tool_result" for e in run.trace):
            return run.cache.token_ids(0)
    raise AssertionError("the tool result never arrived")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_call_runs_once_and_every_worker_sees_the_result(tiny_engines, layout):
    engine = tiny_engines["llama"]
    calls = []
    counted = EngineTool(
        "calculator",
        "arithmetic",
        calculator_tool().parameters,
        lambda expression: calls.append(expression) or calculator_tool().func(expression),
    )
    run = engine.start(
        PROMPT,
        n_workers=3,
        layout=layout,
        protocol=named_script(PROMPT, 3),
        max_new_tokens=40,
        engine_tools=[counted],
        temperature=1.0,
        seed=0,
    )
    run.step()
    run.force(1, call_text("calculator", expression="6 * 7"))
    run_until_result(run, worker=1)
    assert calls == ["6 * 7"]
    block = engine.encode(
        run.script.tool_result.replace("{tool}", "calculator")
        .replace("{worker}", "Bob")
        .replace("{result}", "42")
    )
    for worker in range(3):
        view = run.view_token_ids(worker)
        assert any(view[i : i + len(block)] == block for i in range(len(view))), f"worker {worker}"
    assert run.tool_calls[0].result == "42" and not run.tool_calls[0].error
    assert "</tool_call>\n\n" in run.workers[1].text  # the call ended the caller's step
    for _ in range(4):  # the run goes on, and the caller writes again
        run.step()
    assert run.workers[1].stream[-1] not in engine.encode("</tool_call>")


def test_the_caller_pauses_while_others_keep_writing(tiny_engines):
    engine = tiny_engines["llama"]
    release = threading.Event()
    slow = EngineTool(
        "slow", "waits", {"type": "object", "properties": {}}, lambda: release.wait(10) and "done"
    )
    run = engine.start(
        PROMPT, n_workers=2, protocol=named_script(PROMPT, 2), max_new_tokens=60, engine_tools=[slow]
    )
    run.step()
    run.force(0, call_text("slow"))
    run.step()
    before = (run.workers[0].generated, run.workers[1].generated)
    for _ in range(3):
        run.step()
    assert run.workers[0].generated == before[0]  # paused
    assert run.workers[1].generated == before[1] + 3  # not paused
    with pytest.raises(RuntimeError, match="cannot be forked while a tool call is running"):
        run.fork()
    release.set()
    run.workers[0].waiting.future.result(timeout=5)
    run.step()
    assert run.workers[0].waiting is None and run.tool_calls[0].result == "done"
    run.fork().close()  # between calls: allowed


def result_of(engine, tools, text: str, timeout_s: float = 5.0) -> str:
    run = engine.start(
        PROMPT,
        n_workers=2,
        protocol=named_script(PROMPT, 2),
        max_new_tokens=60,
        engine_tools=ToolRunner(tools, timeout_s=timeout_s, max_result_chars=200),
    )
    run.step()
    run.force(0, text)
    run_until_result(run, worker=0)
    shared = engine.decode(run.cache.token_ids(0))
    for _ in range(2):
        run.step()
    assert not run.workers[0].finished and not run.done  # the run continues after any failure
    assert run.tool_calls[0].result in shared
    return run.tool_calls[0].result


def test_failures_become_visible_error_results(tiny_engines):
    engine = tiny_engines["llama"]

    def explode(x: int) -> str:
        raise RuntimeError("disk on fire")

    tools = [
        EngineTool(
            "explode", "raises", {"type": "object", "properties": {"x": {"type": "integer"}}}, explode
        ),
        EngineTool("hang", "hangs", {"type": "object", "properties": {}}, lambda: time.sleep(3) or "late"),
        EngineTool("huge", "floods", {"type": "object", "properties": {}}, lambda: "x" * 5000),
        EngineTool("raw", "bytes", {"type": "object", "properties": {}}, lambda: b"caf\xc3\xa9 \xff\xfe ok"),
        EngineTool("data", "objects", {"type": "object", "properties": {}}, lambda: {"answer": 42}),
        calculator_tool(),
    ]
    assert (
        result_of(engine, tools, call_text("explode", x=1))
        == "Error: explode raised RuntimeError: disk on fire"
    )
    assert result_of(engine, tools, call_text("hang"), timeout_s=0.3) == "Error: hang timed out after 0.3 s."
    flooded = result_of(engine, tools, call_text("huge"))
    assert flooded.startswith("x" * 200) and "[... output truncated: 4800 more characters]" in flooded
    assert result_of(engine, tools, call_text("raw")) == "café \ufffd\ufffd ok"
    assert result_of(engine, tools, call_text("data")) == '{"answer": 42}'
    malformed = result_of(engine, tools, '<tool_call>{"name": "calculator", "arguments": {1: 2}}</tool_call>')
    assert malformed.startswith("Error: malformed tool call: tool call is not valid JSON")
    unknown = result_of(engine, tools, call_text("rm_rf", path="/"))
    assert unknown.startswith("Error: unknown tool 'rm_rf'; available tools: calculator, data, explode")
    assert result_of(engine, tools, call_text("calculator", expression="__import__('os')")).startswith(
        "Error: calculator raised ValueError"
    )


def test_several_workers_call_at_once_and_async_and_langchain_tools_work(tiny_engines):
    engine = tiny_engines["qwen3"]

    @tool
    def shout(text: str) -> str:
        """Upper-case the text."""
        return text.upper()

    async def wait_and_echo(text: str) -> str:
        """Echo text after an await."""
        await asyncio.sleep(0.01)
        return f"echo {text}"

    seen: list[str] = []
    hooks = Hooks(
        on_tool_call=lambda c: seen.append(f"call {c.name}"),
        on_tool_result=lambda c: seen.append(f"result {c.name}: {c.result}"),
    )
    run = engine.start(
        PROMPT,
        n_workers=3,
        protocol=named_script(PROMPT, 3),
        max_new_tokens=50,
        engine_tools=[shout, EngineTool.from_any(wait_and_echo)],
        hooks=hooks,
    )
    run.step()
    run.force(0, call_text("shout", text="hi"))
    run.force(2, call_text("wait_and_echo", text="bob"))
    for _ in range(8):
        for w in run.workers:
            if w.waiting is not None and w.waiting.future is not None:
                w.waiting.future.exception(timeout=5)
        run.step()
    assert sorted(seen) == [
        "call shout",
        "call wait_and_echo",
        "result shout: HI",
        "result wait_and_echo: echo bob",
    ]
    shared = engine.decode(run.cache.token_ids(0))
    assert "called by Alice → HI" in shared and "called by Carol → echo bob" in shared
    kinds = [e.kind for e in run.result().trace if e.worker is None]
    assert kinds.count("tool_call") == 2 and kinds.count("tool_result") == 2


def test_generate_with_engine_tools_completes(smol_engine):
    docs = {"Paris": "Paris is the capital of France.", "Rome": "Rome is the capital of Italy."}
    result = smol_engine.generate(
        "What is 2+2?",
        n_workers=2,
        max_new_tokens=12,
        engine_tools=[calculator_tool(), document_search_tool(docs)],
    )
    assert all(w.finish_reason for w in result.workers)


def test_arithmetic_evaluator_accepts_arithmetic_only():
    assert evaluate_arithmetic("17 * 23 + 4") == 395
    assert evaluate_arithmetic("sqrt(16) / -2") == -2.0
    for attack in ("__import__('os').system('ls')", "(1).__class__", "open('x')", "2 ** 99999", "a + 1"):
        with pytest.raises(ValueError):
            evaluate_arithmetic(attack)


def test_document_search_ranks_by_keywords():
    search = document_search_tool({"Paris": "capital of France", "Oslo": "capital of Norway, fjords"}).func
    assert search(query="Norway fjords").startswith("Oslo:")
    assert search(query="zebra") == "No document matches the query."


def test_parser_finds_calls_and_reports_malformed_ones():
    text = 'a <tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call> b <tool_call>[1]</tool_call>'
    first, second = find_tool_calls(text)
    assert (first.name, first.arguments, first.valid) == ("f", {"x": 1}, True)
    assert not second.valid and "JSON object" in second.error
    assert (first.start, first.end) == (2, text.index(" b "))
    assert text[second.start : second.end] == "<tool_call>[1]</tool_call>" and second.end == len(text)
    assert find_tool_call("<tool_call>{") is None and open_call_body("x <tool_call>{") == "{"
    assert open_call_body(text) is None and open_call_body(text + " <tool_call> ", second.end) == " "
    assert find_tool_call(call_text("g", y=[1, 2])).arguments == {"y": [1, 2]}


FRAGMENTS = [
    "<tool_call>",
    "</tool_call>",
    "{",
    "}",
    '"name"',
    '"arguments"',
    ":",
    ",",
    '"f"',
    "[",
    "]",
    "1",
    '"',
    "\\",
    "x",
    " ",
    "\n",
    "null",
    '"{}"',
]
RANDOM_TEXT = st.one_of(st.text(max_size=200), st.lists(st.sampled_from(FRAGMENTS), max_size=60).map("".join))


@settings(max_examples=300, deadline=None)
@given(RANDOM_TEXT)
def test_parser_never_crashes_on_random_text(text):
    end = 0
    for match in find_tool_calls(text):
        assert match.start >= end and text[match.start : match.end].startswith(OPEN)  # in order, apart
        assert text[match.start : match.end].endswith(CLOSE)
        assert match.raw == text[match.start + len(OPEN) : match.end - len(CLOSE)].strip()
        if match.valid:
            assert isinstance(match.name, str) and isinstance(match.arguments, dict)
        else:
            assert match.error and not match.arguments
        end = match.end
    body = open_call_body(text, end)
    assert body is None or (text.endswith(body) and CLOSE not in body)


def test_every_call_written_in_one_step_runs_in_order(tiny_engines):
    engine = tiny_engines["llama"]
    run = engine.start(
        PROMPT,
        n_workers=2,
        protocol=named_script(PROMPT, 2),
        max_new_tokens=40,
        engine_tools=[calculator_tool()],
    )
    run.step()
    run.force(0, call_text("calculator", expression="2 + 3") + call_text("calculator", expression="4 * 5"))
    for _ in range(8):
        run.step()
        if len([e for e in run.trace if e.kind == "tool_result"]) == 2:
            break
    assert [c.arguments["expression"] for c in run.tool_calls] == ["2 + 3", "4 * 5"]
    shared = engine.decode(run.cache.token_ids(0))
    assert shared.index("→ 5") < shared.index("→ 20")  # both results, in call order
    assert run.workers[0].waiting is None and not run.workers[0].finished


def test_step_records_report_each_call_once_and_who_runs_it(tiny_engines):
    """The run finds every call (for in-engine tools and callers alike) and reports it in the step's
    record, with whether an in-engine tool runs it, and the calls left open at the step's end."""
    engine = tiny_engines["llama"]
    for engine_tools in ([calculator_tool()], None):
        run = engine.start(
            PROMPT,
            n_workers=2,
            protocol=named_script(PROMPT, 2),
            max_new_tokens=40,
            engine_tools=engine_tools,
        )
        run.step()
        run.force(0, "so " + call_text("calculator", expression="1 + 1") + call_text("lookup", q="x"))
        run.force(1, '<tool_call>{"name": "calc')
        record = run.step()
        first, second = record.tool_calls[0]
        assert (first.worker, first.call.name, first.in_engine) == (0, "calculator", bool(engine_tools))
        assert (second.call.name, second.call.arguments, second.in_engine) == ("lookup", {"q": "x"}, False)
        text = run.workers[0].text
        assert text[first.call.start : first.call.end] == call_text("calculator", expression="1 + 1")
        assert text[second.call.start : second.call.end] == call_text("lookup", q="x")
        assert 1 not in record.tool_calls and record.open_calls == {1: '{"name": "calc'}
        assert 0 not in record.open_calls and run.workers[1].open_call == '{"name": "calc'
        run.force(1, '"}</tool_call>')
        later = run.step()
        assert 0 not in later.tool_calls  # each call is reported once
        assert [c.call.name for c in later.tool_calls[1]] == ["calc"] and not later.open_calls
        assert [c.call for c in run.workers[0].calls] == [first.call, second.call]
        # in-engine tools run every call (a name they lack gets an error result); else none runs
        assert [c.name for c in run.tool_calls] == (["calculator", "lookup", "calc"] if engine_tools else [])


# ---- deeply nested or oversized JSON: an error result, never an exception ------------------------------


@pytest.mark.parametrize(
    "body",
    [
        "[" * 65,  # just past the nesting limit
        "[" * 1000 + "]" * 1000,  # complete JSON, deeper than json's recursion limit
        '{"name": "calculator", "arguments": ' + '{"a": ' * 5000 + "1" + "}" * 5001,
        '{"name": "calculator", "arguments": "' + "[" * 3000 + '"}',  # nested JSON inside a string
        '{"name": "calculator", "arguments": {"expression": ' + "9" * 5000 + "}}",  # over the digit limit
    ],
)
def test_deep_or_huge_json_is_a_malformed_call(body):
    match = find_tool_call(f"<tool_call>{body}</tool_call>")
    assert match is not None and not match.valid and match.error


def test_a_deeply_nested_call_inside_a_run_becomes_an_error_result(tiny_engines):
    engine = tiny_engines["llama"]
    nested = '<tool_call>{"name": "calculator", "arguments": ' + "[" * 1200 + "]" * 1200 + "}</tool_call>"
    quoted = call_text("calculator", expression="(" * 100 + "1" + ")" * 100 + " + 1")  # strings do not nest
    for text, expected in [
        (nested, "Error: malformed tool call: tool call is nested 1201 levels deep (at most 64)."),
        (quoted, "2"),
    ]:
        run = engine.start(
            PROMPT,
            n_workers=2,
            protocol=named_script(PROMPT, 2),
            max_new_tokens=20,
            engine_tools=[calculator_tool()],
        )
        run.step()
        run.force(0, text)
        for _ in range(4):
            run.step()
        assert run.tool_calls[0].result == expected
        assert expected in engine.decode(run.cache.token_ids(0))  # every worker's view holds it


NESTED_TEXT = st.builds(
    lambda depth, opener, middle, close: "<tool_call>" + opener * depth + middle + close + "</tool_call>",
    st.integers(0, 4000),
    st.sampled_from(["[", "{", '{"a":', '{"name": "f", "arguments": {"x":', '"', "\\"]),
    st.sampled_from(["", "1", "9" * 4400, '"x"', "null", "}", "]"]),
    st.sampled_from(["", "]" * 50, "}" * 50, '"}']),
)


@settings(max_examples=200, deadline=None)
@given(st.one_of(NESTED_TEXT, RANDOM_TEXT))
def test_parser_never_raises_on_nested_or_random_text(text):
    for match in find_tool_calls(text):
        if match.valid:
            assert isinstance(match.name, str) and isinstance(match.arguments, dict)
        else:
            assert isinstance(match.error, str) and match.error.startswith(("tool call", "arguments of"))


def test_tool_output_that_cannot_be_text_still_gives_a_result():
    class Unprintable:
        def __str__(self):
            raise RuntimeError("no")

    deep: list = []
    for _ in range(5000):
        deep = [deep]
    assert stringify("lone \ud800 surrogate") == "lone ? surrogate"
    assert stringify(Unprintable()).startswith("<Unprintable that cannot be shown as text")
    assert isinstance(stringify(deep), str)


# ---- tool threads: limits, cancellation and exit ---------------------------------------------------------


def test_tool_threads_run_at_most_max_parallel_and_close_cancels_the_queue():
    running, peak, lock, release = [0], [0], threading.Lock(), threading.Event()

    def slow() -> str:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        release.wait(5)
        with lock:
            running[0] -= 1
        return "ok"

    tool = EngineTool("slow", "slow", {"type": "object", "properties": {}}, slow)
    runner = ToolRunner([tool], max_parallel=2)
    match = find_tool_call(call_text("slow"))
    calls = [runner.submit(match, 0, "w", 0) for _ in range(5)]
    time.sleep(0.3)
    assert peak[0] == 2
    assert all(t.daemon for t in threading.enumerate() if t.name.startswith("hogwild-tool"))
    runner.close()  # the three calls still queued never start
    release.set()
    assert [c.future.result(timeout=5) for c in calls[:2]] == ["ok", "ok"]
    assert all(c.future.cancelled() for c in calls[2:]) and peak[0] == 2
    with pytest.raises(RuntimeError, match="closed"):
        runner.submit(match, 0, "w", 0)


HANGING_RUN = """
import sys, time, threading
sys.path.insert(0, {root!r})
from transformers import AutoTokenizer
from hogwild_agents.hooks import EngineTool
from hogwild_agents.loading import default_model_dir
from tests.conftest import build_tiny_engine, named_script
from tests.test_tool_hooks import call_text

engine = build_tiny_engine("llama", AutoTokenizer.from_pretrained({tokenizer!r} or default_model_dir()))
hang = EngineTool("hang", "never returns", {{"type": "object", "properties": {{}}}}, threading.Event().wait)
prompt = "Work together."
run = engine.start(prompt, n_workers=1, protocol=named_script(prompt, 1), max_new_tokens=6,
                   engine_tools=[hang], tool_timeout_s=0.2)
run.force(0, call_text("hang"))
while not run.done:
    run.step()
run.close()
print(run.tool_calls[0].result, flush=True)
print("DONE", time.time(), flush=True)
"""


def test_a_tool_that_never_returns_does_not_keep_the_process_alive():
    root = str(Path(__file__).resolve().parent.parent)
    script = HANGING_RUN.format(root=root, tokenizer=os.environ.get("HOGWILD_TEST_TOKENIZER", ""))
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"the process did not exit after its run: {out[-500:]}")
    exited = time.time()
    assert process.returncode == 0, err[-2000:]
    assert "Error: hang timed out after 0.2 s." in out
    done = float(out.split("DONE")[1])
    assert exited - done < 20, f"the process took {exited - done:.1f} s to exit after its run"
