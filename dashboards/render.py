"""A picture of a dashboard's data (matplotlib), from real query results: docs/img/trust-dashboard.png.

Grafana is not part of the stack, so the docs show what the trust dashboard's panels hold after a real
run: e2e/observe hands `render()` a function that runs each panel's PromQL over a range on its real
Prometheus, and this module lays the panels out as dashboards/build.py places them (gridPos): a Stat
panel as its last value, a TimeSeries panel as one line per series, legends as the panel's
legendFormat says. Nothing here knows Prometheus; the caller's `fetch` does.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = ["Series", "legend", "render"]

GRID_W = 24            # Grafana's grid columns
ROW_PX = 30            # Grafana's row height in pixels at gridPos.h = 1 (used only for proportions)
_LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")


@dataclass(frozen=True)
class Series:
    """One series of a query range: its labels and (unix seconds, value) points."""

    labels: Mapping[str, str]
    points: Sequence[tuple[float, float]]


Fetch = Callable[[str], Sequence[Series]]


def legend(fmt: str, labels: Mapping[str, str]) -> str:
    """Grafana's legendFormat: `{{phase}}` becomes the series' label value."""
    text = _LEGEND.sub(lambda m: labels.get(m.group(1), ""), fmt).strip()
    return text or ",".join(f"{k}={v}" for k, v in sorted(labels.items()) if k != "__name__") or "value"


def render(dashboard: Mapping[str, Any], fetch: Fetch, out: Path, *,
           substitute: Mapping[str, str] | None = None) -> int:
    """Draw every panel of a dashboard's JSON with the data `fetch` returns; write a PNG to `out`.
    Returns how many series were drawn (0 means the picture shows no data, which callers should refuse)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt
    from matplotlib.dates import DateFormatter, date2num

    panels = list(dashboard.get("panels") or [])
    rows = max((p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels), default=1)
    fig = plt.figure(figsize=(16, rows * ROW_PX / 60), dpi=100)
    fig.suptitle(str(dashboard.get("title", "")), fontsize=14, x=0.01, ha="left")
    grid = fig.add_gridspec(rows, GRID_W, hspace=3.0, wspace=1.2, top=0.93, bottom=0.04, left=0.03, right=0.99)
    drawn = 0
    for panel in panels:
        pos = panel["gridPos"]
        ax = fig.add_subplot(grid[pos["y"]:pos["y"] + pos["h"], pos["x"]:pos["x"] + pos["w"]])
        ax.set_title(str(panel.get("title", "")), fontsize=9, loc="left")
        series: list[tuple[str, Series]] = []
        for target in panel.get("targets") or []:
            expr = str(target["expr"])
            for var, value in (substitute or {}).items():
                expr = expr.replace(var, value)
            series += [(legend(str(target.get("legendFormat", "")), s.labels), s) for s in fetch(expr)]
        if panel.get("type") == "stat":
            ax.set_axis_off()
            last = [s.points[-1][1] for _, s in series if s.points]
            text = _number(sum(last), panel) if last else "No data"
            ax.text(0.5, 0.4, text, ha="center", va="center", fontsize=22,
                    color="#37872d" if last else "#888888", transform=ax.transAxes)
        else:
            for name, s in series:
                if not s.points:
                    continue
                xs = [date2num(datetime.fromtimestamp(t, tz=UTC)) for t, _ in s.points]  # type: ignore[no-untyped-call]
                ax.plot(xs, [v for _, v in s.points], label=name, linewidth=1.2)
            ax.xaxis.set_major_formatter(DateFormatter("%H:%M:%S"))  # type: ignore[no-untyped-call]
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if series:
                ax.legend(fontsize=6, loc="upper left", ncol=2, frameon=False)
            else:
                ax.text(0.5, 0.5, "No data", ha="center", va="center", color="#888888", transform=ax.transAxes)
        drawn += sum(1 for _, s in series if s.points)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return drawn


def _number(value: float, panel: Mapping[str, Any]) -> str:
    unit = str((panel.get("fieldConfig") or {}).get("defaults", {}).get("unit") or panel.get("format") or "")
    if unit in ("s", "seconds"):
        return f"{value:.1f} s"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.2f}"
