"""The named-step progress the long CLI commands show (`demo psi`, `world up`): one spinner line per step,
turned green when the step is done. `World.up` reports its steps through the callable this returns."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

__all__ = ["step_bar", "step_reporter"]


def step_bar(console: Any) -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                    transient=False)


def step_reporter(bar: Progress) -> Callable[..., None]:
    """`progress(step, done=False)`: a new line for a new step; `done=True` marks it finished."""
    steps: dict[str, Any] = {}

    def progress(step: str, done: bool = False) -> None:
        if step not in steps:
            steps[step] = bar.add_task(step, total=None)
        if done:
            bar.update(steps[step], description=f"[green]{step}")
            bar.stop_task(steps[step])

    return progress
