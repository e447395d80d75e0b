"""One layer's decode attention at a long shared context: N workers reading one cache, against SDPA.

    python -m benchmarks.attention --context 16384 --workers 1,2,4,8          # Qwen2.5-7B's layer shape
    python -m benchmarks.attention --device cuda --dtype bfloat16 --context 16384 --workers 1,2,4,8

The scene is a decode step of N workers in the combined layout: a `context`-token shared block, each
worker's step block of `--own` tokens (every worker sees them all) and each worker's new token (random
K/V, one layer of the given shape, RoPE). Timed per call, median ms (CUDA: CUDA events, the SDPA calls
and the compiled static attention captured as CUDA graphs):

- `fast`: the engine's eager fast path (each block read once by the stacked queries of its readers);
- `static` / `static_compiled`: the static decode step's tiled attention, eager and `torch.compile`d;
- `triton` (CUDA): the engine's Triton kernel;
- `sdpa_blocks`: each block attended once by SDPA with its stacked queries, the partial results merged by
  their log-sum-exp (PyTorch's fused SDPA kernels that return it, on the CPU and on CUDA);
- `flex`: FlexAttention (`torch.nn.attention.flex_attention`, compiled), one call over the paged storage
  with a block mask per read, `return_lse`, the same merge;
- `sdpa_one_sequence`: SDPA over ONE sequence holding the unique tokens, attended by the same query
  rows (N x heads): the read-once lower bound;
- `sdpa_separate`: SDPA over N separate sequences, one per worker's view (what a batched decode of N
  independent sequences runs; no sharing).

Each engine path's output is checked against the materialised-view reference (`max_error`). Bytes: the
K/V bytes each path reads (its page tables: the fast path's batches, the static step's tiles with their
padding, the kernel's items) against the unique K/V bytes of all the rows' views, counted here from the
blocks' page lists, independently of the paths' own bookkeeping.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from hogwild_agents.architecture import LayerAttention, ModelAttention
from hogwild_agents.attention import eager_attention, fast_attention
from hogwild_agents.block_attention import LayerProps, rotated_queries
from hogwild_agents.cache import PAGE_SIZE, SHARED, STEPS, KVPool, KVShape, RunCache, pages_for
from hogwild_agents.loading import resolve_device, resolve_dtype
from hogwild_agents.plan import ForwardPlan, RowPlan
from hogwild_agents.rotary import RotarySpec
from hogwild_agents.static_step import LONG_TILE, StaticPlan, decode_tables, static_attention
from hogwild_agents.views import n_header_slots, worker_view

REPEATS = 20
OWN_TOKENS = 64
CHECKED = ("fast", "static", "static_compiled", "triton", "sdpa_blocks", "flex")  # exact: output checked
GRAPHED = ("static_compiled", "sdpa_one_sequence", "sdpa_separate")  # captured as CUDA graphs on CUDA


@dataclass(frozen=True)
class LayerShape:
    """The attention shape of one layer."""

    heads: int
    kv_heads: int
    head_dim: int
    rope_theta: float = 1e6

    def layer(self) -> LayerAttention:
        inv_freq = 1.0 / self.rope_theta ** (
            torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim
        )
        rotary = RotarySpec(inv_freq, 0, False, self.head_dim)
        return LayerAttention(0, rotary, self.heads, self.kv_heads, self.head_dim, self.head_dim)


QWEN25_7B = LayerShape(heads=28, kv_heads=4, head_dim=128)


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


class Scene:
    """A decode forward of N workers over a shared block, in a one-layer pool."""

    def __init__(
        self, layer: LayerAttention, context: int, n: int, own: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        attention = ModelAttention(layers=(layer,), max_positions=context + n * (own + 1) + 1)
        self.layer, self.device, self.dtype = layer, device, dtype
        self.pool = KVPool(KVShape.of(attention, dtype, device), attention)
        self.pool.scratch_page()
        cache = self.cache = RunCache(self.pool, n, n_header_slots(n))
        generator = torch.Generator(device=device).manual_seed(0)

        def kv(tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
            shape = (1, layer.kv_heads, tokens, layer.k_dim)
            k = torch.randn(shape, generator=generator, device=device).to(dtype)
            return k, torch.randn(shape, generator=generator, device=device).to(dtype)

        cache.write_block(SHARED, 0, [0] * context, *kv(context))
        for worker in range(n):
            if own:
                cache.write_block(STEPS, worker, [0] * own, *kv(own))
            start = cache.reserve(STEPS, worker, 1)  # the new token, written as the forward would
            pages, offsets = cache.block(STEPS, worker).locations(start, 1)
            k, v = kv(1)
            self.pool.write(
                0, torch.tensor(pages, device=device), torch.tensor(offsets, device=device), k[0], v[0]
            )
        rows = [RowPlan((0,), tuple(worker_view("combined", w, n, cache.length)), cache) for w in range(n)]
        self.plan = ForwardPlan(rows, self.pool)
        self.query = torch.randn(1, layer.heads, n, layer.k_dim, generator=generator, device=device).to(dtype)
        self.props = LayerProps(scaling=layer.k_dim**-0.5, rotary=layer.rotary)
        self.view_length = rows[0].view_length

    @property
    def page_bytes(self) -> int:
        """Bytes of one page of K and V of this layer."""
        layer = self.layer
        return PAGE_SIZE * layer.kv_heads * (layer.k_dim + layer.v_dim) * torch.finfo(self.dtype).bits // 8

    def unique_pages(self) -> int:
        """Distinct pool pages of all the rows' views, from the blocks' own page lists."""
        seen: set[int] = set()
        for row in self.plan.rows:
            for seg in row.segments:
                length = seg.visible + (len(row.token_ids) if seg is row.target else 0)
                seen.update(row.cache.block(seg.group, seg.slot).pages[: pages_for(length)])
        return len(seen)

    @property
    def unique_tokens(self) -> int:
        return self.cache.tokens_stored + len(self.plan.rows)  # the new tokens are written, not committed


# ---- the comparisons ------------------------------------------------------------------------------------
def stacked_reads(scene: Scene) -> list[tuple[list[int], int, torch.Tensor, torch.Tensor, list[int]]]:
    """Per read: (pages, width, rotated stacked queries [kv_heads, slots * per_kv, dim], per-slot key
    limits [slots], packed token of each slot)."""
    kv_heads = scene.layer.kv_heads
    out = []
    for read in scene.plan.reads:
        token = torch.tensor([[q.token for q in read.queries]], device=scene.device)
        offset = torch.tensor([[q.offset for q in read.queries]], device=scene.device)
        rotation = scene.props.rotary.cos_sin(-offset, torch.float32) if offset.any() else None
        q = rotated_queries(scene.query[0], token, rotation, scene.props, kv_heads)[:, 0]
        limits = torch.tensor([q.limit for q in read.queries], device=scene.device)
        out.append((read.pages, read.width, q, limits, [q.token for q in read.queries]))
    return out


def _lse_merge(
    parts: list[tuple[torch.Tensor, torch.Tensor, list[int]]], tokens: int, per_kv: int
) -> torch.Tensor:
    """Merge per-read outputs [kv_heads, slots * per_kv, dim] with their log-sum-exps by token:
    -> [tokens, heads, dim] fp32."""
    outs, lses, index = [], [], []
    for out, lse, token in parts:
        kv_heads, _, dim = out.shape
        outs.append(out.float().view(kv_heads, len(token), per_kv, dim))
        lses.append(lse.float().view(kv_heads, len(token), per_kv))
        index += token
    out, lse = torch.cat(outs, dim=1), torch.cat(lses, dim=1)
    index_t = torch.tensor(index, device=out.device)
    kv_heads = out.shape[0]
    best = lse.new_full((kv_heads, tokens, per_kv), float("-inf")).index_reduce(1, index_t, lse, "amax")
    weight = torch.exp(lse - best[:, index_t])
    total = lse.new_zeros(kv_heads, tokens, per_kv).index_add(1, index_t, weight)
    merged = out.new_zeros(kv_heads, tokens, per_kv, out.shape[-1]).index_add(
        1, index_t, out * weight[..., None]
    )
    merged = merged / total[..., None]
    return merged.permute(1, 0, 2, 3).reshape(tokens, kv_heads * per_kv, -1)


def _sdpa_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> tuple:
    """SDPA returning its log-sum-exp: q [1, H, Q, d], k/v [1, H, L, d] (scale already in q)."""
    if q.device.type == "cuda":
        bias = (
            None
            if mask is None
            else torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        )
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, scale=1.0)[:2]
        return out, lse
    additive = (
        None if mask is None else torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, float("-inf"))
    )
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=additive, scale=1.0)


def sdpa_blocks(scene: Scene) -> Callable[[], torch.Tensor]:
    """Each block read once by SDPA with its readers' stacked queries, merged by log-sum-exp."""
    storage_k, storage_v = scene.pool.k[0], scene.pool.v[0]
    per_kv = scene.layer.heads // scene.layer.kv_heads
    reads = []
    for pages, width, q, limits, token in stacked_reads(scene):
        index = torch.tensor(pages, device=scene.device)
        mask = None
        if (limits != width).any():  # readers see different prefixes of the block (own new tokens)
            seen = torch.arange(width, device=scene.device)[None] < limits[:, None]  # [slots, width]
            mask = seen.repeat_interleave(per_kv, dim=0)[None, None]
        reads.append((index, width, q[None].contiguous(), mask, token))

    def call() -> torch.Tensor:
        parts = []
        for index, width, q, mask, token in reads:
            k = storage_k[:, index].flatten(1, 2)[None, :, :width]
            v = storage_v[:, index].flatten(1, 2)[None, :, :width]
            out, lse = _sdpa_lse(q, k, v, mask)
            parts.append((out[0], lse[0], token))
        return _lse_merge(parts, scene.plan.n_tokens, per_kv)

    return call


def flex(scene: Scene) -> Callable[[], torch.Tensor]:
    """One compiled FlexAttention call over the paged storage: every read's stacked queries, a block
    mask keeping each query to its read's pages (and its limit), `return_lse`; merged by log-sum-exp."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    device, per_kv = scene.device, scene.layer.heads // scene.layer.kv_heads
    n_pages = scene.pool.n_pages
    page_read = torch.full((n_pages,), -1, dtype=torch.long, device=device)
    page_local = torch.zeros(n_pages, dtype=torch.long, device=device)
    queries, query_read, query_limit, tokens = [], [], [], []
    for r, (pages, _, q, limits, token) in enumerate(stacked_reads(scene)):
        index = torch.tensor(pages, device=device)
        page_read[index] = r
        page_local[index] = torch.arange(len(pages), device=device)
        queries.append(q)
        query_read += [r] * q.shape[1]
        query_limit.append(limits.repeat_interleave(per_kv))
        tokens.append(token)
    q = torch.cat(queries, dim=1)[None]  # [1, kv_heads, all queries, dim]
    total = q.shape[2]
    padded = -(-total // 16) * 16
    q = F.pad(q, (0, 0, 0, padded - total))
    query_read_t = torch.tensor(query_read + [-2] * (padded - total), device=device)
    limit_t = F.pad(torch.cat(query_limit), (0, padded - total))

    def mask_mod(b, h, q_idx, kv_idx):
        page = kv_idx // PAGE_SIZE
        local = page_local[page] * PAGE_SIZE + kv_idx % PAGE_SIZE
        return (page_read[page] == query_read_t[q_idx]) & (local < limit_t[q_idx])

    length = n_pages * PAGE_SIZE
    block_mask = torch.compile(create_block_mask)(
        mask_mod, 1, 1, padded, length, device=device, BLOCK_SIZE=(16, PAGE_SIZE)
    )
    attend = torch.compile(flex_attention, dynamic=False)
    k = scene.pool.k[0].flatten(1, 2)[None]  # [1, kv_heads, pages * PAGE, dim]: the storage, no copy
    v = scene.pool.v[0].flatten(1, 2)[None]

    def call() -> torch.Tensor:
        out, lse = attend(q, k, v, block_mask=block_mask, scale=1.0, return_lse=True)
        out, lse = out[0, :, :total], lse[0, :, :total]
        parts, start = [], 0
        for token in tokens:
            count = len(token) * per_kv
            parts.append((out[:, start : start + count], lse[:, start : start + count], token))
            start += count
        return _lse_merge(parts, scene.plan.n_tokens, per_kv)

    return call


def sdpa_one_sequence(scene: Scene) -> Callable[[], torch.Tensor]:
    """The lower bound: one sequence of the unique tokens, attended by N x heads query rows."""
    layer, device, dtype = scene.layer, scene.device, scene.dtype
    n = len(scene.plan.rows)
    q = torch.randn(1, layer.heads, n, layer.k_dim, device=device, dtype=dtype)
    k = torch.randn(1, layer.kv_heads, scene.unique_tokens, layer.k_dim, device=device, dtype=dtype)
    v = torch.randn_like(k)
    return lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def sdpa_separate(scene: Scene) -> Callable[[], torch.Tensor]:
    """N separate sequences, one per view (a batched decode of N independent sequences)."""
    layer, device, dtype = scene.layer, scene.device, scene.dtype
    n = len(scene.plan.rows)
    q = torch.randn(n, layer.heads, 1, layer.k_dim, device=device, dtype=dtype)
    k = torch.randn(n, layer.kv_heads, scene.view_length, layer.k_dim, device=device, dtype=dtype)
    v = torch.randn_like(k)
    return lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def _static_args(scene: Scene) -> tuple:
    tables = decode_tables(scene.plan, scene.pool.scratch_page())
    rows, long, short = tables.to(scene.device)
    padded = torch.zeros(
        1, scene.layer.heads, tables.shape.rows, scene.layer.k_dim, device=scene.device, dtype=scene.dtype
    )
    padded[:, :, : len(scene.plan.rows)] = scene.query
    padded_pages = tables.shape.long_tiles * LONG_TILE + tables.shape.short_tiles
    return (scene.pool, rows, long, short, tables.shape.slots, padded, scene.props), padded_pages


def _static(pool, rows, long, short, slots, query, props) -> torch.Tensor:
    return static_attention(StaticPlan(pool, rows, long, short, slots), 0, query, props)


# ---- the benchmark --------------------------------------------------------------------------------------
def measure(
    layer: LayerAttention,
    context: int,
    workers: Sequence[int],
    *,
    device: torch.device,
    dtype: torch.dtype,
    own: int = OWN_TOKENS,
    compile: bool = True,
    repeats: int = REPEATS,
) -> list[dict[str, Any]]:
    """Per N: median ms of every comparison, the ratios, the engine paths' errors and bytes read."""
    compiled_static = torch.compile(_static, fullgraph=True, dynamic=False) if compile else None
    rows = []
    for n in workers:
        scene = Scene(layer, context, n, own, dtype, device)
        plan, query, props = scene.plan, scene.query, scene.props
        n_tokens = plan.n_tokens
        static_args, static_pages = _static_args(scene)
        ms: dict[str, float | None] = {}
        errors: dict[str, str] = {}
        outputs: dict[str, torch.Tensor] = {}
        calls: dict[str, Callable[[], Any]] = {
            "fast": lambda p=plan, q=query, props=props: fast_attention(p, 0, q, props)[0],
            "static": lambda a=static_args, n=n_tokens: _static(*a)[0, :n],
        }
        with torch.inference_mode():
            reference = eager_attention(plan, 0, query, props)[0].float()
            if compiled_static is not None:
                calls["static_compiled"] = lambda a=static_args, n=n_tokens: compiled_static(*a)[0, :n]
            if device.type == "cuda":
                from hogwild_agents import triton_attention

                calls["triton"] = lambda p=plan, q=query, props=props: triton_attention.triton_attention(
                    p, 0, q, props
                )[0]
            for name, build in (
                ("sdpa_blocks", sdpa_blocks),
                ("flex", flex),
                ("sdpa_one_sequence", sdpa_one_sequence),
                ("sdpa_separate", sdpa_separate),
            ):
                try:
                    calls[name] = build(scene)
                except Exception as error:  # a library that cannot run here: say why
                    errors[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            for name, call in calls.items():
                try:
                    if name in CHECKED:
                        outputs[name] = call()
                    if name in GRAPHED:
                        call = _graphed(call, device)
                    ms[name] = _time_ms(call, device, repeats)
                except Exception as error:
                    errors[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
                    ms[name] = None
        bound = ms.get("sdpa_one_sequence")
        separate = ms.get("sdpa_separate")
        row: dict[str, Any] = dict(workers=n, context=context, own_tokens=own, view_tokens=scene.view_length)
        row.update({f"{name}_ms": value for name, value in ms.items()})
        for name in CHECKED:
            value = ms.get(name)
            row[f"{name}_vs_one_sequence"] = value / bound if value and bound else None
            row[f"{name}_vs_separate"] = value / separate if value and separate else None
        row["max_error"] = {
            name: float((out.float() - reference).abs().max()) for name, out in outputs.items()
        }
        unique = scene.unique_pages()
        read = dict(
            fast=plan.read_pages()[0], static=static_pages, sdpa_blocks=sum(len(r.pages) for r in plan.reads)
        )
        if device.type == "cuda":
            from hogwild_agents import triton_attention

            read["triton"] = triton_attention.read_table(plan).pages_read
        row["unique_bytes"] = unique * scene.page_bytes
        row["bytes_read"] = {name: pages * scene.page_bytes for name, pages in read.items()}
        row["read_vs_unique"] = {name: pages / unique for name, pages in read.items()}
        row["separate_read_vs_unique"] = n * scene.view_length / scene.unique_tokens
        row["errors"] = errors
        rows.append(row)
        del scene
    return rows


def targets(rows: list[dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """The issue's targets: on the CPU, attention / the read-once lower bound <= 1.3 at N >= 2 and bytes
    read / unique <= 1.1; on CUDA, attention / SDPA over N separate sequences <= 1.2 (N=2), 1.5 (N=4)."""
    out: dict[str, Any] = {}
    for row in rows:
        n = row["workers"]
        for name, ratio in row["read_vs_unique"].items():
            out[f"{name}_bytes_read_vs_unique_n{n}"] = dict(value=ratio, target="<= 1.1")
        if device.type == "cuda":
            limit = {2: "<= 1.2", 4: "<= 1.5"}.get(n)
            for name in ("static_compiled", "triton"):
                if limit and row.get(f"{name}_vs_separate"):
                    out[f"{name}_vs_separate_n{n}"] = dict(value=row[f"{name}_vs_separate"], target=limit)
        elif n >= 2:
            for name in ("fast", "static_compiled"):
                if row.get(f"{name}_vs_one_sequence"):
                    out[f"{name}_vs_one_sequence_n{n}"] = dict(
                        value=row[f"{name}_vs_one_sequence"], target="<= 1.3"
                    )
    return out


TIMED = (
    "fast",
    "static",
    "static_compiled",
    "triton",
    "sdpa_blocks",
    "flex",
    "sdpa_one_sequence",
    "sdpa_separate",
)


def table(rows: list[dict[str, Any]]) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """The report table: ms per comparison, the ratios to the lower bound, bytes read / unique."""
    present = [name for name in TIMED if any(row.get(f"{name}_ms") for row in rows)]
    header = (
        "N",
        "view",
        *(f"{name} ms" for name in present),
        "fast / bound",
        "compiled / bound",
        "bytes read / unique",
    )

    def fmt(value: float | None, digits: int = 2) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    body = []
    for row in rows:
        reads = ", ".join(f"{name} {ratio:.2f}" for name, ratio in row["read_vs_unique"].items())
        body.append(
            (
                str(row["workers"]),
                str(row["view_tokens"]),
                *(fmt(row.get(f"{name}_ms"), 3) for name in present),
                fmt(row["fast_vs_one_sequence"]),
                fmt(row["static_compiled_vs_one_sequence"]),
                reads,
            )
        )
    return header, body


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.attention",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument(
        "--context", type=int, default=16384, help="tokens of the shared block (default 16384)"
    )
    parser.add_argument(
        "--workers", default="1,2,4,8", help="comma-separated worker counts (default 1,2,4,8)"
    )
    parser.add_argument("--own", type=int, default=OWN_TOKENS, help="tokens of each worker's step block")
    parser.add_argument(
        "--heads", type=int, default=QWEN25_7B.heads, help="query heads (default: Qwen2.5-7B's)"
    )
    parser.add_argument("--kv-heads", type=int, default=QWEN25_7B.kv_heads, help="key/value heads")
    parser.add_argument("--head-dim", type=int, default=QWEN25_7B.head_dim, help="head dim")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.add_argument("--dtype", help="float32, bfloat16 or float16 (default: fp32 on CPU, bf16 on GPU)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="timed calls per comparison")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled static attention")
    parser.add_argument("--json", type=Path, help="write the results to this JSON file")
    parser.add_argument("--quick", action="store_true", help="tiny settings for a smoke test")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    workers = sorted({int(w) for w in args.workers.split(",") if w.strip()})
    shape = LayerShape(args.heads, args.kv_heads, args.head_dim)
    context, repeats = args.context, args.repeats
    if args.quick:
        shape, context, repeats, workers = LayerShape(4, 2, 16), 300, 2, [w for w in workers if w <= 2] or [1]
    rows = measure(
        shape.layer(),
        context,
        workers,
        device=device,
        dtype=dtype,
        own=min(args.own, context),
        compile=not args.no_compile,
        repeats=repeats,
    )
    results = dict(
        setup=dict(
            context=context,
            workers=workers,
            heads=shape.heads,
            kv_heads=shape.kv_heads,
            head_dim=shape.head_dim,
            own_tokens=args.own,
            device=str(device),
            gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            dtype=str(dtype).removeprefix("torch."),
            torch=torch.__version__,
            torch_threads=torch.get_num_threads(),
        ),
        rows=rows,
        targets=targets(rows, device),
    )
    header, body = table(rows)
    from benchmarks.report import print_rows

    print_rows(
        f"One layer's decode attention ({shape.heads} heads, {shape.kv_heads} KV heads, "
        f"dim {shape.head_dim}) "
        f"at {context} shared tokens, {device} {dtype}: median ms",
        header,
        body,
    )
    for row in rows:
        if row["errors"]:
            print(f"N={row['workers']}: " + "; ".join(f"{k}: {v}" for k, v in row["errors"].items()))
    for name, target in results["targets"].items():
        print(f"{name}: {target['value']:.2f} (target {target['target']})")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"results written to {args.json}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
