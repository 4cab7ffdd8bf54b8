"""How a table cell is computed from run results, and how paper values are read."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from common.experiments import training_spec


def rounds_to_target(result: dict, target: float) -> tuple[float, bool]:
    """First round whose test accuracy reaches `target`; (budget + 1, True) when never reached."""
    for r, acc in zip(result["metrics"]["round"], result["metrics"]["test_accuracy"]):
        if acc >= target:
            return float(r), False
    return float(result["spec"]["training"]["rounds"] + 1), True


def final_accuracy(result: dict) -> tuple[float, bool]:
    return 100.0 * result["metrics"]["test_accuracy"][-1], False


def best_accuracy(result: dict) -> tuple[float, bool]:
    return 100.0 * max(result["metrics"]["test_accuracy"]), False


def domain_accuracy(result: dict, domain: str) -> tuple[float, bool]:
    """Test accuracy (%) on one domain after the last round, as logged by a run on a multi-domain dataset (the
    global model, or the own model of the client holding the domain for personalised methods)."""
    per_round = result["metrics"].get("domain_accuracy")
    if not per_round:
        raise ValueError(f"run {result.get('run_id', '?')} logged no per-domain accuracy; its dataset has no domains")
    last = per_round[-1]
    if domain not in last:
        raise ValueError(f"run {result.get('run_id', '?')} has no domain '{domain}'; it has {', '.join(last)}")
    return 100.0 * last[domain], False


def mean_last_accuracy(result: dict, last_rounds: int) -> tuple[float, bool]:
    """Mean test accuracy (%) over the last `last_rounds` rounds (all rounds when the run has fewer): less noisy
    than the last round alone, the measure of Reddi et al.'s Table 1."""
    return 100.0 * float(np.mean(result["metrics"]["test_accuracy"][-last_rounds:])), False


def _mean_last_logged(result: dict, key: str, last_rounds: int | None) -> float:
    """Mean of a per-round diagnostic a run logged (e.g. FedNTD's forgetting), over its last `last_rounds` rounds
    (all rounds when None or when the run has fewer); rounds that logged no value (None) are left out."""
    per_round = result["metrics"].get(key)
    if per_round is None:
        raise ValueError(f"run {result.get('run_id', '?')} logged no '{key}'; its method does not compute it")
    values = [v for v in per_round[-last_rounds if last_rounds else 0:] if v is not None]
    return float(np.mean(values)) if values else math.nan


def forgetting(result: dict, last_rounds: int | None = None) -> tuple[float, bool]:
    """Accuracy (% points) on the classes outside a client's local distribution that local training loses: the
    received global model's minus the trained local model's, mean over the round's clients and the last rounds."""
    return 100.0 * _mean_last_logged(result, "forgetting", last_rounds), False


def weight_divergence(result: dict, last_rounds: int | None = None) -> tuple[float, bool]:
    """||w_local - w_global|| / ||w_global|| (%), mean over the round's clients and the last rounds."""
    return 100.0 * _mean_last_logged(result, "weight_divergence", last_rounds), False


def logged(result: dict, logged: str, minus: str | None = None, reduce: str = "mean", scale: float = 1.0) -> tuple[float, bool]:
    """A per-round diagnostic a method logged (e.g. FedDF's `distill_changed`), or the difference of two
    (`logged` - `minus`), reduced over all rounds by its mean or sum (or its value after the last round: `last`),
    times `scale`; rounds without a value are left out."""
    per_round = result["metrics"].get(logged)
    if per_round is None:
        raise ValueError(f"run {result.get('run_id', '?')} logged no '{logged}'; its method does not compute it")
    other = result["metrics"][minus] if minus else [0.0] * len(per_round)
    values = [a - b for a, b in zip(per_round, other) if a is not None and b is not None]
    if not values:
        return math.nan, False
    if reduce == "last":
        return scale * float(values[-1]), False
    return scale * float(np.sum(values) if reduce == "sum" else np.mean(values)), False


def trainable_share(result: dict) -> tuple[float, bool]:
    """Parameters the run trained, in % of its model's parameters (counted from the model after the method froze
    what it does not train; the paper's "task parameters")."""
    m = result["model"]
    return 100.0 * m["trainable_parameters"] / m["parameters"], False


METRICS = {"rounds_to_target": rounds_to_target, "final_accuracy": final_accuracy, "best_accuracy": best_accuracy,
           "domain_accuracy": domain_accuracy, "mean_last_accuracy": mean_last_accuracy, "forgetting": forgetting,
           "weight_divergence": weight_divergence, "logged": logged, "trainable_share": trainable_share}


@dataclass(frozen=True)
class CellValue:
    """A table cell: mean and std over seeds (std None for one seed); `censored` seeds hit the round budget."""
    mean: float | None
    std: float | None = None
    n: int = 0
    censored: int = 0
    diverged: int = 0
    note: str = ""
    per_seed: tuple = ()  # ((seed, value), ...) of the seeds that completed; what the claims are checked on
    exact: bool = False  # a published number (no seed spread known): claims compare it as it is

    @property
    def available(self) -> bool:
        return self.mean is not None and math.isfinite(self.mean)

    def display(self, decimals: int) -> str:
        if self.diverged:
            return "diverged" if self.diverged == self.n else f"diverged ({self.diverged}/{self.n} seeds)"
        if not self.available:
            return self.note or "—"
        if self.censored == self.n:
            return f"> {self.mean - 1:.0f}"
        text = f"{self.mean:.{decimals}f}"
        if self.std is not None:
            text += f"±{self.std:.{decimals}f}"
        if self.censored:
            text = f"≥ {text} ({self.censored}/{self.n} not reached)"
        return text


def cell_value(results: list[dict], metric: str, eval_args: dict) -> CellValue:
    completed = [r for r in results if r["status"] != "diverged"]
    per_seed = tuple((training_spec(r["spec"])["seed"], METRICS[metric](r, **eval_args)[0]) for r in completed)
    if len(completed) < len(results):
        return CellValue(None, n=len(results), diverged=len(results) - len(completed), per_seed=per_seed)
    values = [METRICS[metric](r, **eval_args) for r in results]
    xs = np.array([v for v, _ in values])
    std = float(xs.std(ddof=1)) if len(xs) > 1 else None
    return CellValue(float(xs.mean()), std, len(xs), sum(c for _, c in values), per_seed=per_seed)


NOT_VERIFIED = "not verified"
_PAPER = re.compile(r"^\s*(-?[0-9.]+)\s*(?:±\s*([0-9.]+))?\s*$")


def best_of(values: list[CellValue], lower_is_better: bool) -> int | None:
    """Index of the best available value (the first of equals); None when none is available (e.g. all diverged)."""
    available = [i for i, v in enumerate(values) if v.available]
    if not available:
        return None
    pick = min if lower_is_better else max
    return pick(available, key=lambda i: values[i].mean)


def paper_value(raw) -> CellValue:
    """A value from paper.yaml: a number, "mean±std", null (not reported), or "not verified" (the paper reports it,
    but it could not be read from a primary copy of the paper, so it is not quoted)."""
    if raw is None:
        return CellValue(None, note="not reported")
    if raw == NOT_VERIFIED:
        return CellValue(None, note=NOT_VERIFIED)
    if isinstance(raw, (int, float)):
        return CellValue(float(raw), n=1, per_seed=((None, float(raw)),), exact=True)
    m = _PAPER.match(str(raw))
    if not m:
        raise ValueError(f"cannot read paper value {raw!r}; write a number or 'mean±std'")
    mean = float(m.group(1))
    return CellValue(mean, float(m.group(2)) if m.group(2) else None, n=1, per_seed=((None, mean),), exact=True)


def within_tolerance(ours: CellValue, paper: CellValue, tolerance: dict) -> bool | None:
    """Paper-scale verdict for one cell: |ours - paper| <= absolute, or <= relative * paper."""
    if not (ours.available and paper.available):
        return None
    gap = abs(ours.mean - paper.mean)
    if "absolute" in tolerance:
        return gap <= tolerance["absolute"]
    return gap <= tolerance.get("relative", 0.1) * abs(paper.mean)
