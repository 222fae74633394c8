"""When a subset succeeds: one grammar of success criteria, and the normalised recovery it reads.

A criterion is written QUANTITY OP X, OP one of `OPS` (>, >=, <, <=), QUANTITY a row of
`QUANTITIES`:
  recovery>=0.5   the normalised recovery (patched - target) / (source - target) of the mean
                  metric over prompts (needs the source and target baselines [P]);
  metric>0        the mean metric over prompts (metric<=-1: at most -1 on average);
  fraction>=0.8   the fraction of prompts whose metric is > 0 (answered right, for a logit
                  difference); fraction>=1: every prompt;
  fraction(metric>=1)>=0.5
                  the fraction of prompts whose metric is >= 1 (any OPS, any number).
Parsed by `Criterion.parse`; `Criterion.success` gives bool [N] per subset from metric [N, P].
"""

from __future__ import annotations

import dataclasses
import re
from typing import Union

import numpy as np

from jaxcircuits import checks

OPS = {">": np.greater, ">=": np.greater_equal, "<": np.less, "<=": np.less_equal}


NOISE = 1e-5      # float32 metrics closer than NOISE x the largest magnitude in play are one number


def indistinguishable(a, b, scale=0.0) -> np.ndarray:
    """bool, broadcast: |a - b| <= NOISE x max(|a|, |b|, scale), equal within float32 noise; scale:
    the largest magnitude of the values computed alongside (a metric's), whose rounding the
    difference may carry."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b) <= NOISE * np.maximum(np.maximum(np.abs(a), np.abs(b)), scale)


def _scale(metric) -> float:
    m = np.abs(np.asarray(metric, np.float64))
    return float(np.nanmax(m)) if m.size and not np.isnan(m).all() else 0.0


def recovery(metric, source, target) -> np.ndarray:
    """Normalised recovery of the mean over prompts (Wang et al. 2022):
    (mean patched - mean target) / (mean source - mean target).

    metric [..., P] (e.g. [N, P]: N subsets; [N, R, P]: R resamples of the prompts), source and
    target [..., P] broadcasting against it. Returns [...]: 0 = the unpatched target, 1 = the
    source; NaN (not defined) where the two baselines' means are equal within float noise
    (`indistinguishable`, on the scale of the metric).
    """
    s, t = np.mean(source, -1), np.mean(target, -1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(indistinguishable(s, t, _scale(metric)), np.nan, (np.mean(metric, -1) - t) / (s - t))


def check_recovery_defined(source, target, metric=None) -> None:
    """ValueError unless the means over prompts of the baselines source, target [P] differ beyond
    float noise (on the scale of `metric` too, if given): else recovery is not defined, the source
    does not move the metric."""
    s, t = float(np.mean(source)), float(np.mean(target))
    if indistinguishable(s, t, 0.0 if metric is None else _scale(metric)):
        raise ValueError(f"recovery is undefined: the source and target baselines are equal within float noise "
                         f"(mean source {s:g}, mean target {t:g}); judge by the metric (metric>X, fraction>=X) or "
                         "choose a source that changes it")


# name -> (what the criterion compares, value(criterion, metric [..., P], source, target) -> [...],
#          the range of its threshold)
QUANTITIES = {
    "recovery": ("normalised recovery (patched - target) / (source - target) of the mean metric over prompts",
                 lambda c, m, s, t: recovery(m, s, t), (-np.inf, np.inf)),
    "metric": ("mean metric over prompts", lambda c, m, s, t: np.mean(m, -1), (-np.inf, np.inf)),
    "fraction": ("fraction of prompts whose metric is {prompt_op} {prompt_threshold:g}",
                 lambda c, m, s, t: OPS[c.prompt_op](m, c.prompt_threshold).mean(-1), (0.0, 1.0)),
}
_OP = "(>=|<=|>|<)"
_SPEC = re.compile(rf"\s*(?:fraction\s*\(\s*metric\s*{_OP}\s*([^\s()]+)\s*\)|(\w+))\s*{_OP}\s*(\S+)\s*")
_PROMPT_DEFAULT = (">", 0.0)          # the prompts 'fraction' counts unless written: metric > 0


@dataclasses.dataclass(frozen=True)
class Criterion:
    """When a subset succeeds: `quantity` (a `QUANTITIES` key) `op` (an `OPS` key) `threshold`.

    'recovery' needs the source and target baselines; 'fraction' counts the prompts whose metric
    is `prompt_op` `prompt_threshold` (default: > 0, the prompt is answered right).
    Written and parsed as 'recovery>=0.5', 'metric>0', 'fraction>=0.8', 'fraction(metric<=-1)>=0.5'
    (the module docstring lists the forms).
    """

    quantity: str
    op: str
    threshold: float
    prompt_op: str = _PROMPT_DEFAULT[0]
    prompt_threshold: float = _PROMPT_DEFAULT[1]

    def __post_init__(self):
        if self.quantity not in QUANTITIES or self.op not in OPS or self.prompt_op not in OPS:
            raise ValueError(f"a criterion compares one of {sorted(QUANTITIES)} with one of {sorted(OPS)}, "
                             f"got {self.quantity!r} {self.op!r} (prompts {self.prompt_op!r})")
        checks.within("threshold", self.threshold, *QUANTITIES[self.quantity][2])
        checks.within("prompt_threshold", self.prompt_threshold)
        if self.quantity != "fraction" and self._prompts_written:
            raise ValueError(f"only 'fraction' counts prompts by (prompt_op, prompt_threshold), got "
                             f"{self.quantity!r} with ({self.prompt_op!r}, {self.prompt_threshold!r})")

    @classmethod
    def parse(cls, spec: str) -> "Criterion":
        """'recovery>=0.5' -> Criterion('recovery', '>=', 0.5); 'fraction(metric>=1)>=0.5' ->
        Criterion('fraction', '>=', 0.5, '>=', 1.0); ValueError naming `spec` and the forms otherwise."""
        m = _SPEC.fullmatch(spec) if isinstance(spec, str) else None
        try:
            prompt_op, prompt_threshold, quantity, op, threshold = m.groups()
            prompts = () if quantity else (prompt_op, float(prompt_threshold))
            threshold = float(threshold)
            if (quantity or "fraction") not in QUANTITIES:
                raise ValueError(quantity)
        except (AttributeError, ValueError):
            raise ValueError(f"a success criterion is recovery>=X, metric>X or fraction>=X (any of "
                             f"{', '.join(OPS)}; fraction(metric>Y)>=X counts the prompts with metric > Y), "
                             f"got {spec!r}") from None
        try:
            return cls(quantity or "fraction", op, threshold, *prompts)
        except ValueError as e:
            raise ValueError(f"success criterion {spec!r}: {e}") from None

    @classmethod
    def of(cls, spec: Union[str, "Criterion"]) -> "Criterion":
        """A criterion as given, or parsed from its string (`parse`)."""
        return spec if isinstance(spec, cls) else cls.parse(spec)

    @property
    def needs_baselines(self) -> bool:
        return self.quantity == "recovery"

    @property
    def _prompts_written(self) -> bool:
        return (self.prompt_op, self.prompt_threshold) != _PROMPT_DEFAULT

    def __str__(self) -> str:
        prompts = f"(metric{self.prompt_op}{self.prompt_threshold:g})" if self._prompts_written else ""
        return f"{self.quantity}{prompts}{self.op}{self.threshold:g}"

    def describe(self) -> str:
        """'recovery>=0.5: the normalised recovery ... >= 0.5'."""
        what = QUANTITIES[self.quantity][0].format(prompt_op=self.prompt_op, prompt_threshold=self.prompt_threshold)
        return f"{self}: the {what} {self.op} {self.threshold:g}"

    def value(self, metric, source=None, target=None) -> np.ndarray:
        """The compared quantity: metric [..., P] (source, target [..., P]) -> [...]; metric [N] is
        one prompt per subset. Baselines [P], the prompts' own, must define recovery
        (`check_recovery_defined`: else ValueError); resampled or per-prompt ones (more axes) give
        NaN where they do not, which fails."""
        if self.needs_baselines:
            if source is None or target is None:
                raise ValueError(f"the criterion {self} needs the source and target baselines")
            if np.ndim(source) == 1 and np.ndim(target) == 1:
                check_recovery_defined(source, target, metric)
        m = np.asarray(metric, dtype=np.float64)
        return QUANTITIES[self.quantity][1](self, m[:, None] if m.ndim == 1 else m, source, target)

    def success(self, metric, source=None, target=None) -> np.ndarray:
        """bool [...]: the value meets the criterion."""
        return OPS[self.op](self.value(metric, source, target), self.threshold)

    def success_fraction(self, metric, source=None, target=None) -> np.ndarray:
        """Fraction of the prompts on which the criterion holds, each prompt judged alone (as a
        sweep of one prompt): metric [N, P] or [N], source and target [P] -> float [N]. E.g.
        'metric>0': the fraction of prompts with metric > 0; 'recovery>=0.5': with per-prompt
        recovery (m_p - t_p) / (s_p - t_p) >= 0.5."""
        m = np.asarray(metric, dtype=np.float64)
        alone = lambda x: None if x is None else np.asarray(x, dtype=np.float64)[..., None]
        return self.success(alone(m[:, None] if m.ndim == 1 else m), alone(source), alone(target)).mean(-1)
