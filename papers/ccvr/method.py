"""CCVR: Classifier Calibration with Virtual Representations (Luo et al., NeurIPS 2021, Sec. 4 and Algorithm 1).

After federated training, the final global model is fixed. Each client k passes its training data through the
model's feature extractor (everything before the linear classifier, in eval mode) and sends, per class c, the count
N_ck, the mean mu_ck and the unbiased covariance Sigma_ck of its features. The server pools them into the exact mean
and covariance of the union of the clients' features (Eq. 3-4 of the paper),

    mu_c    = sum_k N_ck mu_ck / N_c,
    Sigma_c = sum_k (N_ck - 1)/(N_c - 1) Sigma_ck + sum_k N_ck/(N_c - 1) mu_ck mu_ck^T - N_c/(N_c - 1) mu_c mu_c^T,

draws `virtual_per_class` virtual features per class from N(mu_c, Sigma_c), and retrains only the classifier head on
them with cross-entropy and SGD. Every other parameter and buffer of the model stays bit-identical.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.calibrate import register_calibration
from common.fl.engine import sub_seed


@dataclass
class ClassStats:
    """One client's message: per class, its number of samples, feature mean and unbiased covariance (float64;
    covariance zero for classes with fewer than two samples, whose covariance is undefined)."""
    counts: torch.Tensor  # (C,)
    means: torch.Tensor  # (C, d)
    covs: torch.Tensor  # (C, d, d)


def class_statistics(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> ClassStats:
    """Per-class count, mean and unbiased covariance of `features` (N, d)."""
    f = features.double()
    d = f.shape[1]
    counts = torch.zeros(num_classes, dtype=torch.long)
    means = torch.zeros(num_classes, d, dtype=torch.float64)
    covs = torch.zeros(num_classes, d, d, dtype=torch.float64)
    for c in range(num_classes):
        fc = f[labels == c]
        counts[c] = len(fc)
        if len(fc):
            means[c] = fc.mean(0)
        if len(fc) > 1:
            centred = fc - means[c]
            covs[c] = centred.T @ centred / (len(fc) - 1)
    return ClassStats(counts, means, covs)


def pool_statistics(clients) -> ClassStats:
    """The server's global per-class mean and covariance from the clients' messages (an iterable of ClassStats):
    exactly those of the union of the clients' features. Classes held by no client have count 0."""
    total_n = sum_mean = sum_second = None
    for s in clients:
        n = s.counts.double()
        first = n[:, None] * s.means  # sum of the client's features per class
        # sum of z z^T over the client's features: (N_ck - 1) Sigma_ck + N_ck mu_ck mu_ck^T
        second = (n - 1).clamp(min=0)[:, None, None] * s.covs + n[:, None, None] * (
            s.means[:, :, None] * s.means[:, None, :])
        if total_n is None:
            total_n, sum_mean, sum_second = s.counts.clone(), first, second
        else:
            total_n, sum_mean, sum_second = total_n + s.counts, sum_mean + first, sum_second + second
    n = total_n.double()
    means = sum_mean / n.clamp(min=1)[:, None]
    covs = (sum_second - n[:, None, None] * (means[:, :, None] * means[:, None, :])) / (n - 1).clamp(min=1)[:, None, None]
    covs[total_n < 2] = 0.0
    return ClassStats(total_n, means, covs)


def sample_virtual(stats: ClassStats, per_class: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_class` draws from N(mu_c, Sigma_c) for every class some client holds, as (features, labels). The
    covariance may be singular (fewer samples than dimensions): draws use its eigen-decomposition."""
    feats, labels = [], []
    for c in range(len(stats.counts)):
        if stats.counts[c] == 0:
            continue
        evals, evecs = torch.linalg.eigh(stats.covs[c])
        eps = torch.randn(per_class, len(evals), generator=generator, dtype=torch.float64)
        feats.append(stats.means[c] + (eps * evals.clamp(min=0).sqrt()) @ evecs.T)
        labels.append(torch.full((per_class,), c, dtype=torch.long))
    return torch.cat(feats).float(), torch.cat(labels)


def retrain_head(head: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float, momentum: float,
                 batch_size: int, generator: torch.Generator) -> tuple[float, int]:
    """SGD with cross-entropy on the virtual features, updating `head` only; (mean loss of the last epoch, steps)."""
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum)
    head.train()
    last, steps = float("nan"), 0
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=generator).to(x.device)
        total, n = 0.0, 0
        for i in range(0, len(y), batch_size):
            b = perm[i:i + batch_size]
            loss = F.cross_entropy(head(x[b]), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, n, steps = total + loss.item(), n + 1, steps + 1
        last = total / max(n, 1)
    return last, steps


@torch.no_grad()
def features_of(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """The representation the classifier head receives, in eval mode (no normalisation statistics change)."""
    model.eval()
    return torch.cat([model.features(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


@register_calibration("ccvr")
class CCVR:
    def __init__(self, virtual_per_class: int = 2000, epochs: int = 10, lr: float = 0.01, momentum: float = 0.9,
                 batch_size: int = 64):
        self.virtual_per_class, self.epochs, self.lr = virtual_per_class, epochs, lr
        self.momentum, self.batch_size = momentum, batch_size

    def client_messages(self, model, ctx):
        x, y = ctx.data.train.x.to(ctx.device), ctx.data.train.y.to(ctx.device)
        for idx in ctx.parts:
            idx = idx.to(ctx.device)
            yield class_statistics(features_of(model, x[idx]).cpu(), y[idx].cpu(), ctx.data.num_classes)

    def calibrate(self, model: torch.nn.Module, ctx) -> dict:
        stats = pool_statistics(self.client_messages(model, ctx))
        gen = torch.Generator().manual_seed(sub_seed(ctx.seed, 0xCC7))
        x, y = sample_virtual(stats, self.virtual_per_class, gen)
        loss, steps = retrain_head(model.head, x.to(ctx.device), y.to(ctx.device), epochs=self.epochs, lr=self.lr,
                                   momentum=self.momentum, batch_size=self.batch_size, generator=gen)
        model.eval()
        return {"train_loss": loss, "steps": steps, "virtual_samples": len(y),
                "class_counts": stats.counts.tolist(), "feature_dim": int(x.shape[1])}
