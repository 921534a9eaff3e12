"""Progress of long loops on the terminal (rich), with the rate, shown only when stderr is a
terminal so logs and CI output stay clean."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")


def track(items: Iterable[T], description: str, total: int | None = None, unit: str = "batches") -> Iterator[T]:
    """Yield `items`, drawing a bar with done/total, rate and time left."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                               TimeRemainingColumn)

    total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
    columns = (TextColumn(description), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
               TextColumn(f"{{task.speed:.2f}} {unit}/s" if total else ""), TimeRemainingColumn())
    with Progress(*columns, transient=True, disable=not sys.stderr.isatty()) as progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task)


@contextmanager
def track_steps(description: str, total: int) -> Iterator[Callable[[str], None]]:
    """A bar for a loop that reports a figure as it goes (a training loss): yields
    `advance(status)`, which counts one step and shows `status` beside the bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn(description), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
               TimeRemainingColumn())
    with Progress(*columns, transient=True, disable=not sys.stderr.isatty()) as progress:
        task = progress.add_task(description, total=total, status="")
        yield lambda status: progress.update(task, advance=1, status=status)
