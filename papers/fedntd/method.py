"""FedNTD (Lee et al., NeurIPS 2022) and its earlier version FedLSD, with the paper's forgetting diagnostics.

Both keep FedAvg's server and change the client's objective: the global model the client received at the start
of the round is a frozen teacher during local training.

- FedNTD (not-true distillation): L = CE(q, y) + beta * L_NTD, where L_NTD = tau^2 * KL(q~_tau^g || q~_tau) and
  q~_tau is the softmax with temperature tau over the *not-true* logits only (the ground-truth logit removed from
  both the local and the global model's logits). As in the authors' current code (github.com/Lee-Gihun/FedNTD,
  algorithms/fedntd/criterion.py, `NTD_Loss._ntd_loss`), the KL is averaged over the batch and multiplied by tau^2
  (the usual distillation scaling, which keeps the gradient's size independent of tau; an earlier commit of
  theirs had no tau^2 factor). At the paper's tau = 1 the factor is 1.
- FedLSD (local self-distillation, the paper's 2021 version): L = (1 - beta) * CE(q, y) + beta * KL(q_tau^g || q_tau)
  on the full softmax, true class included.

Diagnostics, computed for every sampled client of every round and logged per round (the mean over the round's
clients, weighted by their sizes where the authors' code weights them):
- out-of-local-distribution accuracy: class-wise test accuracy weighted by (1 - p_c) / (C - 1), p the client's
  label distribution (`get_round_personalized_acc` in the authors' algorithms/measures.py), of the local model after
  training (`local_out_accuracy`) and of the global model it received (`global_out_accuracy`); `forgetting` is
  global minus local: how much knowledge outside the local distribution local training lost. `absent_forgetting`
  is the same drop on the classes the client holds no sample of (uniform over those classes), and
  `local_in_accuracy` the local model's accuracy weighted by p itself.
- weight divergence: ||w_local - w_global|| / ||w_global|| over the trainable parameters (`weight_divergence`) and
  the unnormalised ||w_local - w_global|| (`weight_divergence_abs`, the quantity of the 2021 version's Figure 3),
  averaged over the round's clients.
`fedavg_diag` is FedAvg with these diagnostics (numerically FedAvg: the diagnostics only evaluate models).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from common.errors import SuiteError
from common.fl.algorithms import Algorithm, register_algorithm

DIAGNOSTICS = ("forgetting", "absent_forgetting", "local_out_accuracy", "global_out_accuracy", "local_in_accuracy",
               "weight_divergence", "weight_divergence_abs")


# --- losses ----------------------------------------------------------------------------------------------------
def not_true_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The logits without the ground-truth column: (N, C) -> (N, C - 1), the other classes in their order."""
    n, c = logits.shape
    keep = torch.ones_like(logits, dtype=torch.bool)
    keep[torch.arange(n, device=logits.device), targets] = False
    return logits[keep].view(n, c - 1)


def kl_batchmean(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """KL(softmax(teacher / tau) || softmax(student / tau)), summed over classes and averaged over the batch."""
    log_q = F.log_softmax(student_logits / tau, dim=1)
    p = F.softmax(teacher_logits / tau, dim=1)
    return F.kl_div(log_q, p, reduction="batchmean")


def ntd_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, tau: float) -> torch.Tensor:
    """L_NTD: tau^2 times the KL of the teacher's and the student's softmax over the not-true classes only."""
    kl = kl_batchmean(not_true_logits(logits, targets), not_true_logits(teacher_logits.detach(), targets), tau)
    return tau ** 2 * kl


def lsd_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """L_LSD: the KL of the teacher's and the student's full softmax (true class included)."""
    return kl_batchmean(logits, teacher_logits.detach(), tau)


# --- diagnostics -----------------------------------------------------------------------------------------------
@torch.no_grad()
def classwise_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                       batch_size: int = 1000) -> torch.Tensor:
    """Test accuracy of each class (float64; nan for a class without test samples), model in eval mode."""
    model.eval()
    pred = torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(y), batch_size)])
    correct = torch.bincount(y[pred == y], minlength=num_classes).double()
    count = torch.bincount(y, minlength=num_classes).double()
    return correct / count


def label_distribution(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    counts = torch.bincount(labels, minlength=num_classes).double()
    return counts / counts.sum()


def out_local_weights(p: torch.Tensor) -> torch.Tensor:
    """Weights of the out-of-local distribution: (1 - p_c) / (C - 1) (they sum to 1)."""
    return (1 - p) / (len(p) - 1)


def absent_weights(p: torch.Tensor) -> torch.Tensor | None:
    """Uniform weights over the classes the client holds no sample of; None when it holds every class."""
    absent = (p == 0).double()
    return absent / absent.sum() if absent.sum() > 0 else None


def diagnostic_subset(y: torch.Tensor, num_classes: int, samples: int | None) -> torch.Tensor:
    """Test samples the accuracy diagnostics use: all (None), or the first samples // C of each class (cheaper;
    deterministic, the same for every run on the dataset)."""
    if samples is None:
        return torch.arange(len(y))
    per_class = max(1, samples // num_classes)
    return torch.cat([(y == c).nonzero().flatten()[:per_class] for c in range(num_classes)]).sort().values


def weight_divergence(local: dict, global_state: dict, names: list[str]) -> tuple[float, float]:
    """(||w_local - w_global|| / ||w_global||, ||w_local - w_global||) over the named entries, in float64."""
    diff = sum(((local[k].double() - global_state[k].double()) ** 2).sum() for k in names)
    norm = sum((global_state[k].double() ** 2).sum() for k in names)
    return float(diff.sqrt() / norm.sqrt()), float(diff.sqrt())


def client_diagnostics(p: torch.Tensor, global_acc: torch.Tensor, local_acc: torch.Tensor) -> dict[str, float]:
    """The accuracy diagnostics of one client: label distribution p, class-wise accuracies of the global model it
    received and of its model after local training."""
    w = out_local_weights(p)
    out = {"local_out_accuracy": float(w @ local_acc), "global_out_accuracy": float(w @ global_acc),
           "local_in_accuracy": float(p @ local_acc)}
    out["forgetting"] = out["global_out_accuracy"] - out["local_out_accuracy"]
    a = absent_weights(p)
    out["absent_forgetting"] = float("nan") if a is None else float(a @ (global_acc - local_acc))
    return out


def aggregate_round(per_client: list[dict], sizes: list[int]) -> dict[str, float]:
    """Per-round values: accuracy diagnostics weighted by client size (as the authors' code weights out_dist_acc),
    weight divergences the plain mean over clients; absent_forgetting over the clients that lack a class."""
    w = np.asarray(sizes, dtype=np.float64)
    w = w / w.sum()
    out = {}
    for key in ("forgetting", "local_out_accuracy", "global_out_accuracy", "local_in_accuracy"):
        out[key] = float(np.dot(w, [d[key] for d in per_client]))
    lacking = [(wi, d["absent_forgetting"]) for wi, d in zip(w, per_client) if not np.isnan(d["absent_forgetting"])]
    out["absent_forgetting"] = (float(sum(wi * v for wi, v in lacking) / sum(wi for wi, _ in lacking))
                                if lacking else None)
    for key in ("weight_divergence", "weight_divergence_abs"):
        out[key] = float(np.mean([d[key] for d in per_client]))
    return out


@register_algorithm("fedavg_diag")
class FedAvgDiagnosed(Algorithm):
    """FedAvg that also logs the forgetting and weight-divergence diagnostics every round."""
    transient = Algorithm.transient + ("x_test", "y_test", "global_acc", "round_diag", "round_sizes", "teacher")

    def __init__(self, server_lr: float = 1.0, diagnostics: bool = True, diag_samples: int | None = None):
        super().__init__(server_lr=server_lr)
        if diag_samples is not None and diag_samples < 1:
            raise SuiteError(f"diag_samples must be >= 1, got {diag_samples}")
        self.diagnostics, self.diag_samples = diagnostics, diag_samples

    def setup(self, ctx):
        super().setup(ctx)
        idx = diagnostic_subset(ctx.data.test.y, ctx.data.num_classes, self.diag_samples)
        self.x_test, self.y_test = ctx.data.test.x[idx].to(ctx.device), ctx.data.test.y[idx].to(ctx.device)
        self.global_acc, self.round_diag, self.round_sizes = None, [], []

    def begin_client(self, model, global_state, client):
        # the first client of a round evaluates the global model it received (once per round)
        if self.diagnostics and self.global_acc is None:
            self.global_acc = classwise_accuracy(model, self.x_test, self.y_test, self.ctx.data.num_classes)

    def end_client(self, model, global_state, client, steps):
        if not self.diagnostics:
            return
        c = self.ctx.data.num_classes
        p = label_distribution(self.ctx.data.train.y[self.ctx.parts[client]], c).to(self.global_acc.device)
        d = client_diagnostics(p, self.global_acc, classwise_accuracy(model, self.x_test, self.y_test, c))
        local = model.state_dict()
        d["weight_divergence"], d["weight_divergence_abs"] = weight_divergence(local, global_state, self.param_names)
        self.round_diag.append(d)
        self.round_sizes.append(len(self.ctx.parts[client]))

    def evaluate(self, run, global_state):
        metrics = super().evaluate(run, global_state)
        if self.diagnostics and self.round_diag:
            metrics.update(aggregate_round(self.round_diag, self.round_sizes))
        self.global_acc, self.round_diag, self.round_sizes = None, [], []
        return metrics


class GlobalTeacher(FedAvgDiagnosed):
    """Local objective with the received global model as a frozen teacher (a copy loaded once per client)."""

    def __init__(self, beta: float = 1.0, tau: float = 1.0, server_lr: float = 1.0, diagnostics: bool = True,
                 diag_samples: int | None = None):
        super().__init__(server_lr=server_lr, diagnostics=diagnostics, diag_samples=diag_samples)
        if beta < 0:
            raise SuiteError(f"beta must be >= 0, got {beta}")
        if tau <= 0:
            raise SuiteError(f"tau must be > 0, got {tau}")
        self.beta, self.tau = beta, tau

    def setup(self, ctx):
        super().setup(ctx)
        self.teacher = ctx.make_model() if self.beta > 0 else None
        if self.teacher is not None:
            self.teacher.requires_grad_(False)

    def begin_client(self, model, global_state, client):
        super().begin_client(model, global_state, client)
        if self.teacher is not None:
            self.teacher.load_state_dict(global_state)
            self.teacher.eval()

    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.teacher(x)


@register_algorithm("fedntd")
class FedNTD(GlobalTeacher):
    """CE + beta * L_NTD (beta = 0: FedAvg exactly; the teacher is then never evaluated)."""

    def local_loss(self, model, x, y):
        logits = model(x)
        ce = F.cross_entropy(logits, y)
        if self.beta == 0:
            return ce
        return ce + self.beta * ntd_loss(logits, self.teacher_logits(x), y, self.tau)


@register_algorithm("fedlsd")
class FedLSD(GlobalTeacher):
    """(1 - beta) * CE + beta * L_LSD, 0 <= beta < 1 (beta = 0: FedAvg exactly)."""

    def __init__(self, beta: float = 0.3, tau: float = 1.0, server_lr: float = 1.0, diagnostics: bool = True,
                 diag_samples: int | None = None):
        if not 0 <= beta < 1:
            raise SuiteError(f"FedLSD's beta must lie in [0, 1), got {beta}")
        super().__init__(beta=beta, tau=tau, server_lr=server_lr, diagnostics=diagnostics, diag_samples=diag_samples)

    def local_loss(self, model, x, y):
        logits = model(x)
        ce = F.cross_entropy(logits, y)
        if self.beta == 0:
            return ce
        return (1 - self.beta) * ce + self.beta * lsd_loss(logits, self.teacher_logits(x), self.tau)
