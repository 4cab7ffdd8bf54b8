"""Beyond Sharing Weights for Deep Domain Adaptation (Rozantsev, Salzmann, Fua; IEEE TPAMI 41(4), 2019), as one
centralised run of the shared engine (unsupervised domain adaptation: common/adaptation.py).

Method `two_stream` trains a source stream and a target stream of the run's network side by side. In the layers
named by `unshared` the two streams have their own weights; every other layer is one module used by both (shared
weights). Per step, on a labelled source batch (x_s, y_s) and an unlabelled target batch x_t of the same size:

    L = CE(source(x_s), y_s) + lambda_u * MMD^2(z_s, z_t) + lambda_w * sum_j r_j,
    r_j = exp(||a_j * theta_s^j + b_j - theta_t^j||^2) - 1

where z are the last layer's outputs of each stream (`mmd_on: logits`; or the representation the head classifies,
`features`), MMD^2 the biased estimate with a Gaussian kernel of bandwidth `sigma` (common/adaptation.py), theta^j all
parameters (weights and biases) of unshared layer j in each stream, and a_j, b_j two learned scalars per unshared
layer (the linear relation between the streams' weights; a = 1, b = 0 at the start, when the streams are equal).
The configurations the paper compares are parameters of this one method:
- `unshared: all` (every layer; the paper's LeNet on MNIST <-> USPS), or a list of layer indices into the network's
  parametrised layers in order (negative from the end; [-2, -1]: the last two, AlexNet's fc7 and fc8 on Office);
- `unshared: none`: one stream (all weights shared) with the MMD term: DDC (Tzeng et al. 2014), the paper's
  shared-weight baseline;
- `lambda_w: 0`: two streams with unshared layers but no weight relation (the paper's "without regulariser");
- the source-only baseline is the engine's `centralised` method on the same partition (no target data).
The first `pretrain_rounds` rounds train the source stream alone on the labelled source data (cross-entropy), the
target stream kept equal to it; adaptation then starts from the source-trained network, as the paper initialises
both streams from a network trained on the source domain. The model evaluated on the target domain's test split
is the target stream; the source domain's test split is evaluated with the source stream. Target labels are never
read (the method sees the target's training inputs only).
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.adaptation import UnsupervisedDA, rbf_mmd2, target_domain
from common.errors import SuiteError
from common.fl.algorithms import register_algorithm
from common.fl.personal import parametrised_layers


def weight_relation(a: torch.Tensor, b: torch.Tensor, source: list[torch.Tensor],
                    target: list[torch.Tensor]) -> torch.Tensor:
    """r = exp(||a * theta_s + b - theta_t||^2) - 1 for one layer, theta its parameters (all of them, flattened)."""
    d2 = sum(((a * s + b - t) ** 2).sum() for s, t in zip(source, target))
    return torch.expm1(d2)


def resolve_layers(layers: list[str], unshared) -> list[str]:
    """The names of the unshared layers: all, none, or indices into `layers` (negative from the end)."""
    if unshared == "all":
        return list(layers)
    if unshared in ("none", None):
        return []
    if not isinstance(unshared, (list, tuple)) or not all(isinstance(i, int) for i in unshared):
        raise SuiteError(f"two_stream: unshared must be 'all', 'none' or a list of layer indices, got {unshared!r}")
    out = []
    for i in unshared:
        if not -len(layers) <= i < len(layers):
            raise SuiteError(f"two_stream: layer index {i} out of range; the network has {len(layers)} "
                             f"parametrised layers ({', '.join(layers)})")
        if layers[i] not in out:
            out.append(layers[i])
    return [n for n in layers if n in out]  # in the network's order


class TwoStream(nn.Module):
    """A source and a target copy of `base`: the layers named in `unshared` are separate modules, every other
    layer is the same module object in both streams (shared weights). `forward` is the target stream; `a` and `b`
    hold one relation per unshared layer."""

    def __init__(self, base: nn.Module, unshared: list[str]):
        super().__init__()
        self.source = base
        self.target = copy.deepcopy(base)
        self.unshared = list(unshared)
        for name in parametrised_layers(base):
            if name not in self.unshared:
                parent, _, child = name.rpartition(".")
                setattr(self.target.get_submodule(parent) if parent else self.target, child,
                        base.get_submodule(name))
        dtype = next(base.parameters()).dtype
        self.a = nn.Parameter(torch.ones(len(self.unshared), dtype=dtype))
        self.b = nn.Parameter(torch.zeros(len(self.unshared), dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.target(x)

    def layer_params(self, stream: nn.Module, name: str) -> list[torch.Tensor]:
        return list(stream.get_submodule(name).parameters(recurse=False))

    def regulariser(self) -> torch.Tensor:
        """sum_j r(theta_s^j, theta_t^j) over the unshared layers (0 with none)."""
        total = self.a.new_zeros(())
        for j, name in enumerate(self.unshared):
            total = total + weight_relation(self.a[j], self.b[j], self.layer_params(self.source, name),
                                            self.layer_params(self.target, name))
        return total

    @torch.no_grad()
    def sync_target(self) -> None:
        """The target stream's unshared layers := the source stream's; a = 1, b = 0."""
        for name in self.unshared:
            for s, t in zip(self.layer_params(self.source, name), self.layer_params(self.target, name)):
                t.copy_(s)
        self.a.fill_(1.0)
        self.b.zero_()


def outputs(stream: nn.Module, x: torch.Tensor, mmd_on: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, the representation MMD compares) of one stream."""
    z = stream.features(x)
    logits = stream.head(z)
    return logits, (logits if mmd_on == "logits" else z)


@register_algorithm("two_stream")
class TwoStreamDA(UnsupervisedDA):
    def __init__(self, unshared="all", lambda_w: float = 1.0, lambda_u: float = 1.0, sigma: float | None = 1.0,
                 mmd_on: str = "logits", pretrain_rounds: int = 0, server_lr: float = 1.0):
        super().__init__(server_lr=server_lr)
        if mmd_on not in ("logits", "features"):
            raise SuiteError(f"two_stream: mmd_on must be 'logits' or 'features', got {mmd_on!r}")
        if lambda_w < 0 or lambda_u < 0:
            raise SuiteError("two_stream: lambda_w and lambda_u must be >= 0")
        if sigma is not None and sigma <= 0:
            raise SuiteError(f"two_stream: sigma must be positive (or null: the median heuristic), got {sigma}")
        if isinstance(unshared, list):
            unshared = [int(i) for i in unshared]
        self.unshared, self.lambda_w, self.lambda_u = unshared, lambda_w, lambda_u
        self.sigma, self.mmd_on, self.pretrain_rounds = sigma, mmd_on, pretrain_rounds
        self.round = 0

    def setup(self, ctx):
        if not isinstance(ctx.model, TwoStream):  # a second set-up (a checkpoint that did not fit) keeps it
            base = ctx.model
            if not (hasattr(base, "features") and hasattr(base, "head")):
                raise SuiteError("two_stream needs a model with `features` and `head` (common/models)")
            ctx.model = TwoStream(base, resolve_layers(parametrised_layers(base), self.unshared)).to(ctx.device)
        super().setup(ctx)
        self.round = 0

    def train_client(self, run, client, round_index):
        self.round = round_index
        return super().train_client(run, client, round_index)

    def local_loss(self, model, x, y):
        logits_s, z_s = outputs(model.source, x, self.mmd_on)
        loss = F.cross_entropy(logits_s, y)
        if self.round < self.pretrain_rounds:
            return loss
        _, z_t = outputs(model.target, self.target_batch(len(x)), self.mmd_on)
        if self.lambda_u:
            loss = loss + self.lambda_u * rbf_mmd2(z_s, z_t, self.sigma)
        if self.lambda_w and model.unshared:
            loss = loss + self.lambda_w * model.regulariser()
        return loss

    def end_client(self, model, global_state, client, steps):
        if self.round < self.pretrain_rounds:
            model.sync_target()  # the streams stay equal while the source stream pretrains

    def evaluate(self, run, global_state):
        """Each domain's test split with its own stream: the target domain's with the target stream, the source
        domain(s)' with the source stream; test_accuracy and test_loss are the means over domains (as every run on
        multi-domain data), domain_accuracy / domain_loss map each domain to its values."""
        from common.fl.engine import evaluate
        model = run.ctx.model
        model.load_state_dict(global_state)
        target = target_domain(run.ctx.spec, run.ctx.data.domains)
        accs, losses = {}, {}
        for d, (name, idx) in enumerate(zip(run.ctx.data.domains, run.client_tests)):
            stream = model.target if d == target else model.source
            accs[name], losses[name] = evaluate(stream, run.x_test[idx], run.y_test[idx])
        with torch.no_grad():
            reg = model.regulariser().item()
        return {"test_accuracy": float(np.mean(list(accs.values()))),
                "test_loss": float(np.mean(list(losses.values()))), "domain_accuracy": accs, "domain_loss": losses,
                "regulariser": reg, "relation_a": model.a.tolist(), "relation_b": model.b.tolist()}
