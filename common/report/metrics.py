"""How a table cell is computed from run results, and how paper values are read."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from common.errors import SuiteError
from common.experiments import training_spec


def rounds_to_target(result: dict, target: float) -> tuple[float, bool]:
    """First round whose test accuracy reaches `target`; (budget + 1, True) when never reached."""
    for r, acc in zip(result["metrics"]["round"], result["metrics"]["test_accuracy"]):
        if acc >= target:
            return float(r), False
    return float(result["spec"]["training"]["rounds"] + 1), True


def final_accuracy(result: dict) -> tuple[float, bool]:
    return 100.0 * result["metrics"]["test_accuracy"][-1], False


def best_accuracy(result: dict, top: int = 1) -> tuple[float, bool]:
    """The best round's test accuracy (%); with `top` = k the mean of the k best rounds' (FedGen's code reports
    the mean of each seed's 5 best rounds)."""
    accs = sorted(result["metrics"]["test_accuracy"], reverse=True)
    return 100.0 * float(np.mean(accs[:top])), False


def domain_accuracy(result: dict, domain: str, last_rounds: int | None = None) -> tuple[float, bool]:
    """Test accuracy (%) on one domain after the last round, as logged by a run on a multi-domain dataset (the
    global model, or the own model of the client holding the domain for personalised methods); with `last_rounds`,
    its mean over the last that many rounds (a retrieval run's rank-1: common/retrieval.py)."""
    per_round = result["metrics"].get("domain_accuracy")
    if not per_round:
        raise ValueError(f"run {result.get('run_id', '?')} logged no per-domain accuracy; its dataset has no domains")
    last = per_round[-1]
    if domain not in last:
        raise ValueError(f"run {result.get('run_id', '?')} has no domain '{domain}'; it has {', '.join(last)}")
    if last_rounds:
        return 100.0 * float(np.mean([r[domain] for r in per_round[-last_rounds:]])), False
    return 100.0 * last[domain], False


def _site_value(result: dict, key: str, domain: str, structure: str) -> float | None:
    per_round = result["metrics"].get(key)
    if not per_round:
        raise ValueError(f"run {result.get('run_id', '?')} logged no '{key}'; its dataset is not a multi-site "
                         f"segmentation dataset")
    last = per_round[-1]
    if domain not in last or structure not in last[domain]:
        raise ValueError(f"run {result.get('run_id', '?')} has no site '{domain}' / structure '{structure}'")
    return last[domain][structure]


def site_dice(result: dict, domain: str, structure: str) -> tuple[float, bool]:
    """Dice (%) of one structure on one site's test images after the last round (common/segmentation.py): the
    unseen site's in a leave-one-site-out run."""
    return 100.0 * _site_value(result, "domain_dice", domain, structure), False


def site_hd95(result: dict, domain: str, structure: str) -> tuple[float, bool]:
    """95% Hausdorff distance (pixels) of one structure on one site's test images after the last round, mean over
    the images where it is defined (both masks non-empty); NaN when it is defined on none."""
    value = _site_value(result, "domain_hd95", domain, structure)
    return (math.nan if value is None else float(value)), False


def accuracy_at_round(result: dict, at_round: int) -> tuple[float, bool]:
    """Test accuracy (%) after round `at_round` of a longer run: one run read at several budgets (with a constant
    learning rate, round r of a longer run is the last round of an r-round run), e.g. an under-training check."""
    rounds = result["metrics"]["round"]
    if at_round not in rounds:
        raise SuiteError(f"run {result.get('run_id')} has no round {at_round} (it ran rounds {rounds[0]}-{rounds[-1]})"
                         if rounds else f"run {result.get('run_id')} has no rounds")
    return 100.0 * result["metrics"]["test_accuracy"][rounds.index(at_round)], False


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


def logged(result: dict, logged: str, minus: str | None = None, reduce: str = "mean", scale: float = 1.0,
           prefix: str = "", entry: str | int | None = None, last_rounds: int | None = None) -> tuple[float, bool]:
    """A per-round diagnostic a method logged (e.g. FedDF's `distill_changed`), or the difference of two
    (`logged` - `minus`), reduced over all rounds by its mean or sum (or its value after the first or the last
    round: `first`, `last`; `std`: its standard deviation over rounds, ddof 1, e.g. how a test accuracy oscillates),
    times `scale`; rounds without a value are left out, and with `last_rounds` only the last that many rounds count.
    `prefix` reads `<prefix><logged>` (a method that logs the same metric for references, e.g. MRAA's `copy_l1` beside `l1`). With `entry`, the
    diagnostic is a per-round mapping or list (e.g. a value per site) and its value at `entry` is read."""
    logged = prefix + logged
    per_round = result["metrics"].get(logged)
    if per_round is None:
        raise ValueError(f"run {result.get('run_id', '?')} logged no '{logged}'; its method does not compute it")
    if entry is not None:
        per_round = [None if r is None else r[entry] for r in per_round]
    other = [0.0] * len(per_round)
    if minus:
        other = result["metrics"][minus]
        other = [None if r is None else r[entry] for r in other] if entry is not None else other
    pairs = list(zip(per_round, other))[-last_rounds:] if last_rounds else zip(per_round, other)
    values = [a - b for a, b in pairs if a is not None and b is not None]
    if not values:
        return math.nan, False
    if reduce == "std":
        return (scale * float(np.std(values, ddof=1)) if len(values) > 1 else math.nan), False
    if reduce in ("first", "last"):
        return scale * float(values[0 if reduce == "first" else -1]), False
    return scale * float(np.sum(values) if reduce == "sum" else np.mean(values)), False


def round_bytes(result: dict, direction: str = "both") -> list[float]:
    """Bytes of each round summed over its clients: uploaded ("up"), downloaded ("down") or both, as the run
    logged them (common/fl/communication.py)."""
    metrics = result["metrics"]
    if "bytes_up" not in metrics:
        raise ValueError(f"run {result.get('run_id', '?')} logged no bytes (it predates communication accounting)")
    keys = {"up": ("bytes_up",), "down": ("bytes_down",), "both": ("bytes_up", "bytes_down")}[direction]
    return [float(sum(sum(metrics[k][r]) for k in keys)) for r in range(len(metrics["round"]))]


def bytes_to_target(result: dict, target: float, direction: str = "both", scale: float = 1e-6) -> tuple[float, bool]:
    """Cumulative bytes (all clients; times `scale`, default MB) until the first round whose test accuracy reaches
    `target`; (total of all rounds + 1, True) when never reached, as rounds_to_target's budget + 1."""
    total = 0.0
    for b, acc in zip(round_bytes(result, direction), result["metrics"]["test_accuracy"]):
        total += b
        if acc >= target:
            return scale * total, False
    return scale * total + 1, True


def bytes_per_round(result: dict, direction: str = "up", scale: float = 1e-6) -> tuple[float, bool]:
    """Bytes one client sends (or receives) per round, mean over rounds and clients, times `scale` (default MB)."""
    per_client = [b for r in result["metrics"][f"bytes_{direction}"] for b in r]
    return scale * float(np.mean(per_client)), False


def accuracy_at_bytes(result: dict, budget: float, direction: str = "both", scale: float = 1e-6) -> tuple[float, bool]:
    """Test accuracy (%) after the last round whose cumulative bytes (times `scale`) stay within `budget`; 0 when
    even the first round needs more (no model within the budget)."""
    total, acc = 0.0, None
    for b, a in zip(round_bytes(result, direction), result["metrics"]["test_accuracy"]):
        total += b
        if scale * total > budget * (1 + 1e-9):
            break
        acc = a
    return (0.0 if acc is None else 100.0 * acc), False


def communication_seconds(result: dict, bandwidth_mbit: float, latency_ms: float) -> list[float]:
    """Per round, the modelled time on the wire: each client has its own link of `bandwidth_mbit` Mbit/s and
    `latency_ms` one-way latency to the server; the round waits for the slowest client's download and upload."""
    m = result["metrics"]
    rate = bandwidth_mbit * 1e6 / 8  # bytes per second
    return [max(2 * latency_ms / 1e3 + (d + u) / rate for d, u in zip(down, up))
            for down, up in zip(m["bytes_down"], m["bytes_up"])]


def time_to_target(result: dict, target: float, bandwidth_mbit: float, latency_ms: float,
                   compute: bool = True) -> tuple[float, bool]:
    """Seconds until the first round reaching `target`: per round the modelled communication
    (`communication_seconds`) plus, with `compute`, the measured compute of one client: the median over rounds of
    the round's local work divided by its clients (who run in parallel in the modelled system; the median, as
    other processes on a shared machine slow some rounds). (Total + 1, True) when never reached."""
    m = result["metrics"]
    comm = communication_seconds(result, bandwidth_mbit, latency_ms)
    step = float(np.median([s / len(c) for s, c in zip(m["train_seconds"], m["clients"])])) if compute else 0.0
    total = 0.0
    for r, acc in enumerate(m["test_accuracy"]):
        total += step + comm[r]
        if acc >= target:
            return total, False
    return total + 1, True
def trainable_share(result: dict) -> tuple[float, bool]:
    """Parameters the run trained, in % of its model's parameters (counted from the model after the method froze
    what it does not train; the paper's "task parameters")."""
    m = result["model"]
    return 100.0 * m["trainable_parameters"] / m["parameters"], False


def client_compute(result: dict, quantity: str = "flops", scale: float = 1.0) -> tuple[float, bool]:
    """What one client runs, counted from its model when the run was set up (`common/models/compute.py`): forward
    FLOPs per sample (`flops`) or parameters (`parameters`) of the part of the model a client trains (a split
    network's edge; the whole model otherwise), times `scale`."""
    counts = result["model"].get("client")
    if counts is None:
        raise ValueError(f"run {result.get('run_id', '?')} has no client compute counts (its model does not say "
                         f"which part a client runs: common/models/split.py)")
    return scale * float(counts[quantity]), False


METRICS = {"rounds_to_target": rounds_to_target, "final_accuracy": final_accuracy, "best_accuracy": best_accuracy,
           "domain_accuracy": domain_accuracy, "site_dice": site_dice, "site_hd95": site_hd95,
           "mean_last_accuracy": mean_last_accuracy, "accuracy_at_round": accuracy_at_round, "forgetting": forgetting,
           "weight_divergence": weight_divergence, "logged": logged,
           "bytes_to_target": bytes_to_target, "bytes_per_round": bytes_per_round, "accuracy_at_bytes": accuracy_at_bytes,
           "time_to_target": time_to_target, "trainable_share": trainable_share,
           "client_compute": client_compute}


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
        if self.censored == self.n:  # a censored value is the budget + 1 (rounds, bytes, seconds)
            return f"> {self.mean - 1:.{decimals}f}"
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


def grid_point_values(points, results: dict, metric: str, eval_args: dict) -> list[CellValue]:
    """The value of each grid point of a cell (`points`: its RunsAndMetric points; `results`: run id -> result)."""
    return [cell_value([results[r] for r in p.run_ids], metric, eval_args) for p in points]


def best_grid_point(points, results: dict, metric: str, eval_args: dict, lower_is_better: bool) -> int | None:
    """Index of a cell's best grid point (on the runs it has: the tuning seed's), None when every point diverged.
    The one choice both the confirmation runs (common/confirm.py) and the report make."""
    return best_of(grid_point_values(points, results, metric, eval_args), lower_is_better)


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
