"""Self-contained report directories: report.md (command first), results.json, PNG plots."""

from __future__ import annotations

import json
import re
import os
import shlex
import sys
import time
from typing import Any, Sequence

import numpy as np

from jaxcircuits import analysis, plots
from jaxcircuits.analysis import jsonable


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3) -> str:
    """A markdown table; floats rounded to `digits`."""
    cell = lambda v: f"{v:.{digits}f}" if isinstance(v, (float, np.floating)) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


class Report:
    """Collects markdown sections and JSON results; `write()` saves them under `out_dir`."""

    def __init__(self, out_dir: str, title: str):
        self.out_dir = out_dir
        os.makedirs(out_dir, exist_ok=True)
        self.command = "python -m " + " ".join(
            [os.path.splitext(os.path.relpath(sys.argv[0]))[0].replace(os.sep, ".")] + [shlex.quote(a) for a in sys.argv[1:]])
        self.sections = [f"# {title}", f"Command:\n\n```\n{self.command}\n```",
                         f"Written {time.strftime('%Y-%m-%d %H:%M:%S')}."]
        self.results: dict = {"command": self.command}
        self.t0 = time.time()

    def path(self, name: str) -> str:
        return os.path.join(self.out_dir, name)

    def add(self, heading: str, *parts: str) -> None:
        self.sections.append(f"## {heading}\n\n" + "\n\n".join(p for p in parts if p))

    def figure(self, path: str, caption: str) -> str:
        return f"![{caption}]({os.path.relpath(path, self.out_dir)})"

    def write(self) -> str:
        self.results["elapsed_s"] = round(time.time() - self.t0, 1)
        with open(self.path("results.json"), "w") as f:
            json.dump(jsonable(self.results), f, indent=1)
        with open(self.path("report.md"), "w") as f:
            f.write("\n\n".join(self.sections) + f"\n\nTotal time: {self.results['elapsed_s']} s.\n")
        return self.path("report.md")


def add_sweep_analysis(report: Report, name: str, subsets: np.ndarray, metric: np.ndarray,
                       unit_names: Sequence[str], success_kind: str = "positive",
                       threshold: float = 0.0, aggregate: str = "mean") -> dict:
    """Analyse one sweep (subsets bool [N, n], metric [N, P]) into a report section with plots.

    Success per subset: `analysis.success_from(metric, success_kind, threshold, aggregate)`.
    Returns the JSON summary (also stored in report.results[name]).
    """
    success = analysis.success_from(metric, success_kind, threshold, aggregate)
    summary = analysis.summarize(subsets, success, metric, unit_names=unit_names)
    tag = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")
    figs = [report.figure(plots.plot_success_rate(
        summary["rate_by_size"], report.path(f"{tag}_success.png"),
        spread=analysis.metric_by_size(subsets, analysis.success_fraction(metric, success_kind, threshold)),
        threshold=summary["threshold"], title=f"{name}: success rate by subset size"), "success by size")]
    figs.append(report.figure(plots.plot_metric_by_size(
        summary["metric_by_size"], report.path(f"{tag}_metric.png"), "metric (mean over prompts)",
        title=f"{name}: metric by subset size"), "metric by size"))
    if summary["importance"] is not None:
        figs.append(report.figure(plots.plot_unit_importance(
            summary["importance"]["shapley"], summary["importance"]["banzhaf"],
            report.path(f"{tag}_importance.png"), unit_names, title=f"{name}: unit importance"), "importance"))
    if summary["minimal_sufficient"] and summary["minimal_sufficient"]["count"]:
        sets = analysis.minimal_sufficient(subsets, success)
        figs.append(report.figure(plots.plot_minimal_inclusion(
            sets, report.path(f"{tag}_minimal.png"), unit_names,
            title=f"{name}: units in minimal sufficient sets"), "minimal sets"))
    report.add(name, analysis.report_markdown(summary), " ".join(figs))
    report.results[name] = summary
    return summary
