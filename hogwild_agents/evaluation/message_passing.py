"""Message passing that re-prefills: the baseline a shared cache is measured against (paper, section 4).

N agents, each its own sequence (a one-worker run with its own cache, its prompt the N-worker protocol's,
its headers those of its worker in the interleaved layout), decode side by side, one batched forward per
step. Every `sync_every` steps each agent's cache is extended with what the others wrote
since its last sync, as a block the model encodes: the re-prefill a shared cache avoids, counted in the
agent's forward passes and in the tokens the model embeds. What an agent is sent is cut where the
others stood one step earlier, so every agent gets the same cut whatever order the driver advances
them in. The first agent to write a final answer ends the work for all; when none does, the first
agent's finisher answers, inside its forward-pass cap (the others stop at their cap without one).

A run's forward passes are those of its longest agent (the agents run side by side; each agent's own
re-prefill forwards included); its tokens and embedded tokens are the sum over the agents.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from hogwild_agents.plan import ForwardPlan
from hogwild_agents.results import HogwildResult, StepRecord, TokenEvent, TraceEvent, Usage
from hogwild_agents.run import HogwildRun, Idle, wait_for_first
from hogwild_agents.script import RunScript

SYNC_EVERY = 32  # tokens between syncs (the benchmark's K)


def agent_seed(seed: int | None, agent: int) -> int | None:
    """Agent `agent`'s sampling seed: an independent stream per agent (None stays unseeded)."""
    if seed is None:
        return None
    digest = hashlib.sha256(f"reprefill-agent:{seed}:{agent}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 2


def message_block(name: str, text: str) -> str:
    """How an agent is shown what another wrote since its last sync."""
    return f"[{name}, since the last message:]\n{text.strip()}\n\n"


def agent_script(script: RunScript, agent: int) -> RunScript:
    """Worker `agent` of an N-worker script as a one-worker script: the same prompt and rules, its own
    name and headers."""
    return replace(
        script,
        worker_names=(script.worker_names[agent],),
        own_headers=(script.own_header(agent),) if script.own_headers else (),
        step_header=lambda worker, step: script.step_header(agent, step),
    )


class _Group:
    """The agents' shared bookkeeping: what each wrote, where it stood after each step, what each was
    sent of the others."""

    def __init__(self, names: Sequence[str], sync_every: int) -> None:
        self.names = list(names)
        self.sync_every = sync_every
        self.text = ["" for _ in names]  # each agent's chosen text (not what it was sent)
        self.length_after: list[dict[int, int]] = [{} for _ in names]  # step -> len(text)
        self.sent = [[0] * len(names) for _ in names]  # sent[i][j]: chars of j's text i has seen

    def listener(self, agent: int):
        def on_event(event: Any) -> None:
            if isinstance(event, TokenEvent):
                self.text[agent] += event.text

        return on_event

    def after_step(self, agent: int, run: HogwildRun, record: StepRecord) -> bool:
        self.length_after[agent][record.index] = len(self.text[agent])
        step = record.index + 1  # steps this agent has taken
        finished = record.finished.get(0)
        if finished is not None:
            return agent != 0 and finished == "length"  # at its cap: only the first agent answers
        if step % self.sync_every == 0:
            blocks = []
            for other, name in enumerate(self.names):
                if other == agent:
                    continue
                cut = self.length_after[other].get(record.index - 1, len(self.text[other]))
                new = self.text[other][self.sent[agent][other] : cut]
                self.sent[agent][other] = max(self.sent[agent][other], cut)
                if new.strip():
                    blocks.append(message_block(name, new))
            if blocks:
                run.inject("".join(blocks), kind="message")
        return False


class _AgentController:
    def __init__(self, group: _Group, agent: int) -> None:
        self.group, self.agent = group, agent

    def start(self, run: HogwildRun) -> None:
        pass

    def after_step(self, run: HogwildRun, record: StepRecord) -> bool:
        return self.group.after_step(self.agent, run, record)

    def finish(self, run: HogwildRun, stopped: bool) -> None:
        pass


def run_reprefill(
    engine: Any,
    prompt: Any,
    *,
    n_agents: int,
    sync_every: int = SYNC_EVERY,
    protocol: Any = None,
    seed: int | None = None,
    **options: Any,
) -> HogwildResult:
    """Run `prompt` as `n_agents` message-passing agents that re-prefill each other's text every
    `sync_every` steps; options as `HogwildEngine.build_run` (each agent is a one-worker run of them).
    Returns one result: a worker per agent, the first answer, the agents' costs combined."""
    if n_agents < 1 or sync_every < 1:
        raise ValueError(f"n_agents and sync_every must be positive, got {n_agents} and {sync_every}.")
    options.pop("n_workers", None)
    options.pop("layout", None)
    script = engine.script(prompt, n_agents, "interleaved", protocol, options.get("tools"))
    names = script.worker_names
    group = _Group(names, sync_every)
    pool = engine.new_pool()
    runs = [
        engine.build_run(
            prompt,
            n_workers=1,
            layout="interleaved",
            protocol=agent_script(script, i),
            seed=agent_seed(seed, i),
            pool=pool,
            **options,
        )
        for i in range(n_agents)
    ]
    reserved = sum(run.reservation_pages for run in runs)
    pool.reserve(reserved)
    results: dict[int, HogwildResult] = {}
    order: list[int] = []  # agents in the order their runs ended
    programs = {}
    try:
        for i, run in enumerate(runs):
            run.add_listener(group.listener(i))
            programs[i] = run.program(_AgentController(group, i))
        requests = {i: _advance(program, None) for i, program in programs.items()}
        while programs:
            _collect_ended(programs, requests, results, order)
            if any(results[i].answer for i in order):
                break
            rows_of = {i: r for i, r in requests.items() if isinstance(r, list)}
            if not rows_of:
                if requests:
                    wait_for_first(next(iter(requests.values())))
                    requests = {i: _advance(programs[i], None) for i in programs}
                continue
            rows = [row for i in rows_of for row in rows_of[i]]
            logits = engine.forward(ForwardPlan(rows, pool), runs[0].attend)
            start = 0
            for i, agent_rows in rows_of.items():
                requests[i] = _advance(programs[i], logits[start : start + len(agent_rows)])
                start += len(agent_rows)
        for i in list(programs):  # an answer came: the others stop where they are
            programs.pop(i).close()
            runs[i].cancel()
            results[i] = runs[i].result()
    finally:
        for program in programs.values():
            program.close()
        for run in runs:
            run.close()
        pool.unreserve(reserved)
    return combine([results[i] for i in range(n_agents)], names, order)


class _Ended:
    def __init__(self, value: HogwildResult) -> None:
        self.value = value


def _advance(program: Any, value: Any) -> list | Idle | _Ended:
    try:
        return program.send(value)
    except StopIteration as stop:
        return _Ended(stop.value)


def _collect_ended(
    programs: dict[int, Any], requests: dict[int, Any], results: dict[int, HogwildResult], order: list[int]
) -> None:
    for i in [i for i, r in requests.items() if isinstance(r, _Ended)]:
        results[i] = requests.pop(i).value
        programs.pop(i)
        order.append(i)


def combine(results: Sequence[HogwildResult], names: Sequence[str], order: Sequence[int]) -> HogwildResult:
    """The agents' results as one: a worker per agent (named as in an N-worker run), the answer of the
    first agent that gave one (else the first agent's), tokens summed, forward passes of the longest."""
    answered = [i for i in order if results[i].answer]
    first = answered[0] if answered else 0
    workers = [replace(r.workers[0], name=name) for r, name in zip(results, names, strict=True)]
    trace = [
        TraceEvent(e.step, i if e.worker is not None else None, e.kind, e.text)
        for i, r in enumerate(results)
        for e in r.trace
    ]
    trace.sort(key=lambda e: e.step)
    reasons = {r.finish_reason for r in results}
    finish = "stop" if answered else results[0].finish_reason
    if "timeout" in reasons and not answered:
        finish = "timeout"
    return HogwildResult(
        final_text=results[first].final_text,
        answer=results[first].answer,
        workers=workers,
        shared_text="\n\n".join(f"[{name}]\n{r.shared_text}" for r, name in zip(results, names, strict=True)),
        usage=Usage(
            sum(r.usage.prompt_tokens for r in results),
            sum(r.usage.generated_tokens for r in results),
            sum(r.usage.forward_tokens for r in results),
            sum(r.usage.reused_tokens for r in results),
        ),
        steps=max(r.steps for r in results),
        finish_reason=finish,
        trace=trace,
        forward_passes=max(r.forward_passes for r in results),
    )
