"""Adaptive server optimisers (Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2).

The engine hands the server optimiser the pseudo-gradient g_t = x_t - mean_i(x_i) in `p.grad` (see
`Algorithm.server_update`), i.e. minus the mean client change Delta. With Delta = -g_t, one step of Algorithm 2 is

    Delta_t = beta1 * Delta_{t-1} + (1 - beta1) * Delta                  (line 10)
    v_t     = FedAdagrad: v_{t-1} + Delta_t^2                             (line 11)
              FedYogi:    v_{t-1} - (1 - beta2) * Delta_t^2 * sign(v_{t-1} - Delta_t^2)   (line 12)
              FedAdam:    beta2 * v_{t-1} + (1 - beta2) * Delta_t^2        (line 13)
    x_{t+1} = x_t + eta * Delta_t / (sqrt(v_t) + tau)                     (line 14)

with Delta_{-1} = 0 and v_{-1} = tau^2, and no bias correction (the algorithm has none).
FedAdagrad, FedAdam and FedYogi are FedAvg's loop with one of these optimisers on the server.
"""
from __future__ import annotations

import torch

from common.fl.algorithms import Algorithm, register_algorithm


class AdaptiveServerOptimizer(torch.optim.Optimizer):
    """Lines 10 and 14 of Algorithm 2; subclasses supply the second-moment update (lines 11-13)."""

    def __init__(self, params, lr: float, beta1: float, beta2: float, tau: float):
        if lr < 0 or tau <= 0 or not 0 <= beta1 < 1 or not 0 <= beta2 < 1:
            raise ValueError(f"invalid hyper-parameters lr={lr}, beta1={beta1}, beta2={beta2}, tau={tau}")
        super().__init__(params, {"lr": lr, "beta1": beta1, "beta2": beta2, "tau": tau})

    @staticmethod
    def second_moment(v: torch.Tensor, delta_sq: torch.Tensor, beta2: float) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, beta1, beta2, tau = group["lr"], group["beta1"], group["beta2"], group["tau"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["delta"] = torch.zeros_like(p)
                    state["v"] = torch.full_like(p, tau * tau)
                # the pseudo-gradient points away from the clients: the mean client change is its negative
                delta = state["delta"].mul_(beta1).add_(p.grad, alpha=-(1 - beta1))
                state["v"] = self.second_moment(state["v"], delta * delta, beta2)
                p.addcdiv_(delta, state["v"].sqrt().add_(tau), value=lr)


class AdagradServer(AdaptiveServerOptimizer):
    @staticmethod
    def second_moment(v, delta_sq, beta2):
        return v + delta_sq


class AdamServer(AdaptiveServerOptimizer):
    @staticmethod
    def second_moment(v, delta_sq, beta2):
        return beta2 * v + (1 - beta2) * delta_sq


class YogiServer(AdaptiveServerOptimizer):
    @staticmethod
    def second_moment(v, delta_sq, beta2):
        return v - (1 - beta2) * delta_sq * torch.sign(v - delta_sq)


class _AdaptiveFedOpt(Algorithm):
    """FedAvg's clients with an adaptive server optimiser; only the server optimiser differs."""
    optimizer: type[AdaptiveServerOptimizer]

    def __init__(self, server_lr: float, beta1: float, beta2: float, tau: float):
        super().__init__(server_lr=server_lr)
        self.beta1, self.beta2, self.tau = beta1, beta2, tau

    def make_server_optimizer(self, params):
        return self.optimizer(params, lr=self.server_lr, beta1=self.beta1, beta2=self.beta2, tau=self.tau)


# Defaults: tau = 1e-3 is the value the paper's code recommends for every task and optimiser
# (google-research/federated, optimization/README.md); beta1 = 0.9 and beta2 = 0.999 are the Keras defaults that
# the paper's runs kept (optimization/docs/hyperparameters.md).

@register_algorithm("fedadagrad")
class FedAdagrad(_AdaptiveFedOpt):
    optimizer = AdagradServer

    # beta1 = 0 by default: the paper's code runs FedAdagrad with Keras' Adagrad, which has no momentum.
    # Adagrad's second moment has no decay, so there is no beta2 to set.
    def __init__(self, server_lr: float = 0.1, beta1: float = 0.0, tau: float = 1e-3):
        super().__init__(server_lr, beta1, 0.0, tau)


@register_algorithm("fedadam")
class FedAdam(_AdaptiveFedOpt):
    optimizer = AdamServer

    def __init__(self, server_lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.999, tau: float = 1e-3):
        super().__init__(server_lr, beta1, beta2, tau)


@register_algorithm("fedyogi")
class FedYogi(_AdaptiveFedOpt):
    optimizer = YogiServer

    def __init__(self, server_lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.999, tau: float = 1e-3):
        super().__init__(server_lr, beta1, beta2, tau)
