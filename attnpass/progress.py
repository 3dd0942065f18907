"""Progress for long CLI operations: a rich spinner per step on stderr, so stdout stays clean for ``--json``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn


class Steps:
    """``with steps(total=4) as step: step("loading"); ...`` — one bar advancing over named steps."""

    def __init__(self, progress: Progress | None, task: int | None):
        self._progress, self._task, self._started = progress, task, False

    def __call__(self, description: str) -> None:
        if self._progress is None or self._task is None:
            return
        if self._started:
            self._progress.advance(self._task)
        self._started = True
        self._progress.update(self._task, description=description)


@contextlib.contextmanager
def steps(total: int, enabled: bool = True) -> Iterator[Steps]:
    """A progress bar over ``total`` steps on stderr (transient: it disappears when done)."""
    console = Console(stderr=True)
    if not enabled or not console.is_terminal:
        yield Steps(None, None)
        return
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("starting", total=total)
        yield Steps(progress, task)
        progress.update(task, completed=total)
