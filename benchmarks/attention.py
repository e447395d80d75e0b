"""One layer's attention at a long context: N workers' views of one shared prompt against SDPA.

    python -m benchmarks.run --device cuda --config qwen2.5-7b --attention-context 16384 --workers 2,4

The hogwild side is a pool holding a `context`-token shared block (random K/V, one layer) and N workers
writing their first step (combined layout): each view is the whole context plus the worker's own new
token. The baseline is `scaled_dot_product_attention` over N independent sequences of `context` tokens
(q_len 1, GQA), the attention a batched decode of N sequences runs. Timed per call: the eager fast path,
the static step's attention, eager and compiled, and (CUDA) the Triton kernel. On CUDA the SDPA call
and the compiled static attention are captured as CUDA graphs, so both are timed without launch overhead.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from hogwild_agents.attention import fast_attention
from hogwild_agents.cache import SHARED, STEPS, KVPool, KVShape, RunCache
from hogwild_agents.engine import HogwildEngine
from hogwild_agents.plan import ForwardPlan, RowPlan
from hogwild_agents.static_step import StaticPlan, decode_tables, static_attention
from hogwild_agents.views import n_header_slots, worker_view

REPEATS = 20


def _time_ms(fn: Callable[[], Any], device: torch.device, repeats: int = REPEATS) -> float:
    """Median ms of `fn()` (after two warm-up calls)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def _graphed(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """On CUDA: `fn` captured as a CUDA graph (its replay); elsewhere `fn` itself."""
    if device.type != "cuda":
        return fn
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _plan(engine: HogwildEngine, context: int, n: int) -> ForwardPlan:
    """A decode forward of N workers over a `context`-token shared block, in a one-layer pool."""
    shape = KVShape(1, engine.kv_heads, engine.head_dim, engine.dtype, engine.device)
    pool = KVPool(shape, engine.rotations)
    pool.scratch_page()
    cache = RunCache(pool, n, n_header_slots(n))
    generator = torch.Generator(device=engine.device).manual_seed(0)
    kv = (1, engine.kv_heads, context, engine.head_dim)
    k = torch.randn(kv, generator=generator, device=engine.device, dtype=engine.dtype)
    v = torch.randn(kv, generator=generator, device=engine.device, dtype=engine.dtype)
    cache.write_block(SHARED, 0, [0] * context, k, v)
    rows = []
    for worker in range(n):
        cache.reserve(STEPS, worker, 1)
        segments = worker_view("combined", worker, n, cache.length)
        rows.append(RowPlan((0,), tuple(segments), cache))
    return ForwardPlan(rows, pool)


def attention_overhead(
    engine: HogwildEngine, context: int, workers: Sequence[int], compile: bool = True
) -> list[dict[str, Any]]:
    """Per N: median ms of one layer's attention, each implementation against SDPA."""
    device, dtype = engine.device, engine.dtype
    heads = engine.model.config.get_text_config().num_attention_heads
    scaling = engine.head_dim**-0.5
    compiled_attention = torch.compile(_static, fullgraph=True, dynamic=False) if compile else None
    rows = []
    for n in workers:
        plan = _plan(engine, context, n)
        query = torch.randn(1, heads, n, engine.head_dim, device=device, dtype=dtype)
        q_sdpa = query[0].transpose(0, 1)[:, :, None]  # [n, heads, 1, dim]
        k_sdpa = torch.randn(n, engine.kv_heads, context, engine.head_dim, device=device, dtype=dtype)
        v_sdpa = torch.randn_like(k_sdpa)
        tables = decode_tables(plan, plan.pool.scratch_page(), min_pages=1)
        ints = tables.ints.to(device)
        padded = torch.zeros(1, heads, tables.row_bucket, engine.head_dim, device=device, dtype=dtype)
        padded[:, :, :n] = query
        args = (plan.pool, ints, tables.row_bucket, tables.page_bucket, padded, scaling)
        with torch.inference_mode():
            sdpa = _graphed(
                lambda q=q_sdpa, k=k_sdpa, v=v_sdpa: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                device,
            )
            row = dict(
                workers=n,
                context=context,
                sdpa_ms=_time_ms(sdpa, device),
                fast_ms=_time_ms(lambda p=plan, q=query: fast_attention(p, 0, q, scaling), device),
                static_ms=_time_ms(lambda a=args: _static(*a), device),
                static_compiled_ms=None,
                triton_ms=None,
            )
            if compiled_attention is not None:
                static = _graphed(lambda a=args: compiled_attention(*a), device)
                row["static_compiled_ms"] = _time_ms(static, device)
            if device.type == "cuda":
                from hogwild_agents import triton_attention

                row["triton_ms"] = _time_ms(
                    lambda p=plan, q=query: triton_attention.triton_attention(p, 0, q, scaling), device
                )
        row["static_vs_sdpa"] = row["static_ms"] / row["sdpa_ms"]
        compiled = row["static_compiled_ms"]
        row["compiled_vs_sdpa"] = None if compiled is None else compiled / row["sdpa_ms"]
        rows.append(row)
        del plan
    return rows


def _static(
    pool: KVPool, ints: torch.Tensor, rows: int, pages: int, query: torch.Tensor, scaling: float
) -> torch.Tensor:
    return static_attention(StaticPlan(pool, ints, rows, pages), 0, query, scaling)
