"""Print benchmark results as tables (rich when installed, plain text otherwise)."""

from __future__ import annotations

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
            ("N", "hogwild", "batched decode", "generate", "vs decode", "vs generate"),
            [
                (
                    _fmt(r["workers"]),
                    _fmt(r["hogwild_ms"]),
                    _fmt(r["decode_ms"]),
                    _fmt(r["generate_ms"]),
                    _fmt(r["vs_decode"]),
                    _fmt(r["vs_generate"]),
                )
                for r in results["latency"]
            ],
        ),
        (
            "Total throughput, tokens/s (ratio: N workers / single-stream generate)",
            ("N", "hogwild", "single stream", "ratio"),
            [
                (
                    _fmt(r["workers"]),
                    _fmt(r["hogwild_tokens_per_s"], 1),
                    _fmt(r["single_stream_tokens_per_s"], 1),
                    _fmt(r["ratio"]),
                )
                for r in results["throughput"]
            ],
        ),
        (
            "Seeing each other every K tokens: tokens processed after the prompt, and wall time",
            (
                "N",
                "K",
                "hogwild tokens",
                "re-encoded",
                "wall s",
                "message-passing tokens",
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
            "KV cache (hogwild: each token once; baseline: N sequences of prompt + generated tokens)",
            (
                "N",
                "tokens",
                "B/token",
                "used MiB",
                "allocated MiB",
                "used = tokens x B/token",
                "baseline MiB",
                "baseline / used",
            ),
            [
                (
                    _fmt(r["workers"]),
                    _fmt(r["tokens_stored"]),
                    _fmt(r["bytes_per_token"]),
                    _fmt(r["bytes_used"] * mb),
                    _fmt(r["bytes_allocated"] * mb),
                    _fmt(r["bytes_used"] == r["tokens_stored"] * r["bytes_per_token"]),
                    _fmt(r["baseline_bytes"] * mb),
                    _fmt(r["baseline_vs_hogwild"]),
                )
                for r in results["kv_cache"]
            ],
        ),
    ]
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
    ]
    for name, target in results.get("targets", {}).items():
        lines.append(f"{name}: {target['value']:.2f} (target {target['target']})")
    return lines


def print_tables(results: dict[str, Any]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        Console = None
    if Console is None:
        for title, header, rows in tables(results):
            widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
            print(f"\n{title}")
            for row in (header, *rows):
                print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
        print("\n" + "\n".join(summary(results)))
        return
    console = Console()
    for title, header, rows in tables(results):
        table = Table(title=title, title_justify="left")
        for h in header:
            table.add_column(h, justify="right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    console.print("\n".join(summary(results)), highlight=False)
