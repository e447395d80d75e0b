"""Print benchmark results as tables (rich when installed, plain text otherwise)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

Row = Sequence[str]


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def tables(results: dict[str, Any]) -> list[tuple[str, Row, list[Row]]]:
    """(title, header, rows) of every section that has results."""
    mb = 1 / 2**20
    out = [
        (
            "Step latency, median ms (ratio: N workers / baseline with N sequences)",
            (
                "N",
                "hogwild",
                "decode (DynamicCache)",
                "decode (StaticCache)",
                "generate",
                "vs dynamic",
                "vs static",
                "vs generate",
            ),
            [
                (
                    _fmt(r["workers"]),
                    _fmt(r["hogwild_ms"]),
                    _fmt(r["decode_ms"]),
                    _fmt(r["static_decode_ms"]),
                    _fmt(r["generate_ms"]),
                    _fmt(r["vs_decode"]),
                    _fmt(r["vs_static_decode"]),
                    _fmt(r["vs_generate"]),
                )
                for r in results["latency"]
            ],
        ),
        (
            "Compiled decode step, median ms (hogwild: static step, torch.compile (+ CUDA graphs); "
            "baseline: StaticCache decode, torch.compile)",
            ("N", "hogwild compiled", "hogwild eager", "compiled / eager", "StaticCache compiled", "ratio"),
            [
                (
                    _fmt(r["workers"]),
                    _fmt(r["hogwild_compiled_ms"]),
                    _fmt(r["hogwild_eager_ms"]),
                    _fmt(r["compiled_vs_eager"]),
                    _fmt(r["static_decode_compiled_ms"]),
                    _fmt(r["vs_static_decode_compiled"]),
                )
                for r in results.get("compiled", [])
            ],
        ),
        (
            "Total throughput, tokens/s (ratio: N streams / single-stream generate; batched decode's "
            "ratio is what batching N independent sequences gives alone)",
            ("N", "hogwild", "single stream", "ratio", "batched decode", "its ratio", "compiled ratio"),
            [
                (
                    _fmt(r["workers"]),
                    _fmt(r["hogwild_tokens_per_s"], 1),
                    _fmt(r["single_stream_tokens_per_s"], 1),
                    _fmt(r["ratio"]),
                    _fmt(r["decode_tokens_per_s"], 1),
                    _fmt(r["decode_ratio"]),
                    _fmt(r.get("compiled_ratio")),
                )
                for r in results["throughput"]
            ],
        ),
        (
            "Seeing each other every K tokens: tokens the model embedded after the prompt (a hook on "
            "the input embeddings), and wall time",
            (
                "N",
                "K",
                "hogwild embedded",
                "re-encoded",
                "wall s",
                "message-passing embedded",
                "re-encoded",
                "wall s",
                "tokens x",
                "time x",
            ),
            [
                (
                    _fmt(r["workers"]),
                    _fmt(r["sync_every"]),
                    _fmt(r["hogwild"]["processed_tokens"]),
                    _fmt(r["hogwild"]["re_encoded_tokens"]),
                    _fmt(r["hogwild"]["wall_s"]),
                    _fmt(r["message_passing"]["processed_tokens"]),
                    _fmt(r["message_passing"]["re_encoded_tokens"]),
                    _fmt(r["message_passing"]["wall_s"]),
                    _fmt(r["tokens_ratio"]),
                    _fmt(r["time_ratio"]),
                )
                for r in results["message_passing"]
            ],
        ),
        (
            "KV cache (hogwild: each token once, in 16-token pages; DynamicCache baseline: N sequences "
            "of prompt + generated tokens; StaticCache: N x its fixed length)",
            (
                "N",
                "tokens",
                "B/token",
                "used MiB",
                "allocated MiB",
                "pool MiB",
                "dynamic MiB",
                "dynamic / used",
                "dynamic / allocated",
                "static MiB",
            ),
            [
                (
                    _fmt(r["workers"]),
                    _fmt(r["tokens_stored"]),
                    _fmt(r["bytes_per_token"]),
                    _fmt(r["bytes_used"] * mb),
                    _fmt(r["bytes_allocated"] * mb),
                    _fmt(r["pool_bytes_allocated"] * mb),
                    _fmt(r["baseline_bytes"] * mb),
                    _fmt(r["baseline_vs_used"]),
                    _fmt(r["baseline_vs_allocated"]),
                    _fmt(r["static_baseline_bytes"] * mb),
                )
                for r in results["kv_cache"]
            ],
        ),
    ]
    if results.get("attention"):
        from benchmarks.attention import table

        context = results["attention"][0]["context"]
        header, rows = table(results["attention"])
        out.append((f"Attention of one layer at {context} shared tokens, median ms", header, rows))
    if results["bandwidth"]:
        bandwidth = results["setup"]["bandwidth"]
        out.append(
            (
                f"Memory-bandwidth bound at {bandwidth:.3g} B/s: (weights + KV read) / bandwidth",
                (
                    "N",
                    "hogwild MiB read",
                    "bound ms",
                    "measured / bound",
                    "compiled / bound",
                    "decode MiB read",
                    "bound ms",
                    "measured / bound",
                ),
                [
                    (
                        _fmt(r["workers"]),
                        _fmt(r["hogwild_bytes_read"] * mb, 0),
                        _fmt(r["hogwild_bound_ms"], 3),
                        _fmt(r["hogwild_vs_bound"]),
                        _fmt(r.get("hogwild_compiled_vs_bound")),
                        _fmt(r["decode_bytes_read"] * mb, 0),
                        _fmt(r["decode_bound_ms"], 3),
                        _fmt(r["decode_vs_bound"]),
                    )
                    for r in results["bandwidth"]
                ],
            )
        )
    return [t for t in out if t[2]]


def summary(results: dict[str, Any]) -> list[str]:
    s = results["setup"]
    lines = [
        f"model {s['model'] or s['config']} | {s['device']} {s['gpu'] or ''} | {s['dtype']} | "
        f"context {s['context']} | {s['steps']}x{s['repeats']} timed steps | layout {s['layout']} | "
        f"torch {s['torch']} ({s['torch_threads']} threads), transformers {s['transformers']}"
        + (" | compiled step timed" if s.get("compile") else "")
    ]
    for name, target in results.get("targets", {}).items():
        lines.append(f"{name}: {target['value']:.2f} (target {target['target']})")
    return lines


def print_rows(title: str, header: Row, rows: list[Row]) -> None:
    """Print one table (rich when installed, plain text otherwise)."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        print(f"\n{title}")
        for row in (header, *rows):
            print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
        return
    table = Table(title=title, title_justify="left")
    for h in header:
        table.add_column(h, justify="right")
    for row in rows:
        table.add_row(*row)
    Console(width=None if sys.stdout.isatty() else 200).print(table)  # files and pipes: wide tables


def print_tables(results: dict[str, Any]) -> None:
    for title, header, rows in tables(results):
        print_rows(title, header, rows)
    print("\n" + "\n".join(summary(results)))
