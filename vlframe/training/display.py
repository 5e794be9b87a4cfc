"""What a training run shows: one line per event, and a progress bar on a terminal (rank 0 only)."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Display:
    """Rank 0's console: :meth:`say` a line, :meth:`show` a step (the bar, or a line when logged)."""

    def __init__(self, console: Console | None, rank: int) -> None:
        self.console = console or Console(stderr=True, soft_wrap=True)
        self.rank = rank
        self._progress: Progress | None = None
        self._task: Any = None

    def say(self, text: str, *, markup: bool = False) -> None:
        """One line (rank 0 only); ``markup``: rich markup in ``text`` is meant (paths and server
        errors may hold [brackets], so it is off by default)."""
        if self.rank == 0:
            self.console.print(text, highlight=False, markup=markup)

    def running(self, total: int, done: int) -> AbstractContextManager[Any]:
        """The progress bar for ``total`` steps, ``done`` already."""
        self._progress = Progress(
            TextColumn("step {task.completed}/{task.total}"), BarColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=self.console, disable=self.rank != 0 or not self.console.is_terminal,
        )
        self._task = self._progress.add_task("train", total=total, completed=done, info="")
        return self._progress

    def show(self, step: int, total: int, metrics: dict[str, float], *, logged: bool) -> None:
        if self._progress is None:
            return
        self._progress.update(self._task, completed=step, info=summary(metrics))
        if not self._progress.live.is_started and logged:
            self.say(f"step {step}/{total} {summary(metrics)}")


def summary(metrics: dict[str, float]) -> str:
    """``loss 2.31 loss_caption 2.01 | 35.1 img/s lr 5.00e-04``: a step's metrics on one line."""
    parts = [f"{k.removeprefix('train/')} {v:.3f}" for k, v in metrics.items() if k.startswith("train/loss")]
    return " ".join(parts) + f" | {metrics['train/images_per_s']:.1f} img/s lr {metrics['train/lr']:.2e}"


__all__ = ["Display", "summary"]
