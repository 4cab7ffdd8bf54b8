"""Adaptive server optimisers of Reddi et al. 2021, "Adaptive Federated Optimization": FedAdagrad, FedAdam, FedYogi.

The engine hands the server optimiser the pseudo-gradient g_t = x_t - mean_i(x_i) in `p.grad` (see
`Algorithm.server_update`), i.e. minus the mean client change Delta_t. FedAdagrad, FedAdam and FedYogi are FedAvg's
loop with one of the optimisers below on the server; only the server step differs.

The paper's equation (Algorithm 2, as printed; Delta_t on the right of line 10 is the mean client change):

    m_t     = beta1 * m_{t-1} + (1 - beta1) * Delta_t                                (line 10, m_t printed "Delta_t")
    v_t     = FedAdagrad: v_{t-1} + m_t^2                                            (line 11)
              FedYogi:    v_{t-1} - (1 - beta2) * m_t^2 * sign(v_{t-1} - m_t^2)      (line 12)
              FedAdam:    beta2 * v_{t-1} + (1 - beta2) * m_t^2                      (line 13)
    x_{t+1} = x_t + eta * m_t / (sqrt(v_t) + tau)                                    (line 14)

with m_{-1} = 0, v_{-1} >= tau^2 and no bias correction.

What the authors' code does, and this module follows: the paper's tuned server learning rates and taus
(optimization/docs/hyperparameters.md) come from the authors' code (google-research/federated, optimization/), so
the suite implements the authors' update rule, not the printed one. Their server optimiser is a Keras optimiser
applied to the pseudo-gradient g_t = -Delta_t (optimization/shared/fed_avg_schedule.py, `server_update`: "multiply
weights_delta by -1.0 to view it as a gradient"), chosen by `--server_optimizer` among tf.keras.optimizers.Adagrad,
tf.keras.optimizers.Adam and their own Yogi (optimization/shared/optimizer_utils.py, later
utils/optimizers/optimizer_utils.py `_SUPPORTED_OPTIMIZERS_CLS`; utils/optimizers/yogi.py), with tau passed as
the optimiser's `epsilon` (`--server_{adagrad,adam,yogi}_epsilon`) and, for Adagrad and Yogi,
`--server_{adagrad,yogi}_initial_accumulator_value=0.0` "for all experiments" (optimization/README.md;
optimization/docs/hyperparameters.md, table of default flags). beta1 = 0.9 and beta2 = 0.999 are the Keras
defaults, kept for all runs (hyperparameters.md). Keras is the TF 2.x OptimizerV2 one (the code predates TF 2.11;
optimization/requirements.txt pins tensorflow~=2.8): keras/optimizer_v2/adam.py and adagrad.py. One step, with
t = 1, 2, ... counting server rounds, g = g_t the pseudo-gradient and eps = tau:

    FedAdam (Keras Adam; m_0 = v_0 = 0, fixed in Keras):
        m_t = beta1 * m_{t-1} + (1 - beta1) * g
        v_t = beta2 * v_{t-1} + (1 - beta2) * g^2
        x  -= eta * sqrt(1 - beta2^t) / (1 - beta1^t) * m_t / (sqrt(v_t) + eps)
    FedYogi (their utils/optimizers/yogi.py; v_0 = initial_accumulator_value = 0 as configured, m_0 = 0):
        m_t = beta1 * m_{t-1} + (1 - beta1) * g          (beta1 = 0: m_t = g)
        v_t = v_{t-1} + (1 - beta2) * sign(g^2 - v_{t-1}) * g^2
        x  -= eta * sqrt(1 - beta2^t) / (1 - beta1^t) * m_t / (sqrt(v_t) + eps)
    FedAdagrad (Keras Adagrad, no momentum; v_0 = initial_accumulator_value = 0 as configured):
        v_t = v_{t-1} + g^2
        x  -= eta * g / (sqrt(v_t) + eps)

The differences from the printed Algorithm 2: (1) the second moment squares the raw pseudo-gradient g_t, not the
momentum m_t; (2) v starts at 0, not at v_{-1} >= tau^2; (3) Adam and Yogi use Adam's bias correction, folded
into the step size as Keras does: eps is added to sqrt(v_t) (Kingma and Ba's "epsilon hat", the formula before
their Sec. 2.1), not to sqrt(v_t / (1 - beta2^t)) as in PyTorch's Adam, so with the same tau the denominator's
eps weighs 1/sqrt(1 - beta2^t) times more in early rounds than in PyTorch's Adam. (Keras' TF >= 2.11 Adagrad
puts eps inside the square root, sqrt(v_t + eps); the authors' Keras did not.) The printed rule's steps are
larger than the authors' over the first rounds (its v is built from the (1 - beta1)-shrunk momentum and starts at
tau^2, and it has no bias correction): for FedAdam with beta1 = 0.9, beta2 = 0.999, tau = 1e-3 and a constant
pseudo-gradient of 1e-3 to 1e-2 per coordinate, about twice the authors' step in round 1 and 3 to 6 times it by
round 10. The paper's tuned learning rates therefore belong to the authors' rule.

FedAdagrad keeps the parameter beta1 of the suite's method spec: beta1 = 0 (the default and the paper's runs) is
exactly Keras Adagrad; beta1 > 0 adds Algorithm 2's momentum (line 10, no bias correction), which the authors'
runs never used. Yogi's sign(0) = 0, as tf.sign: a coordinate whose g and v are both 0 keeps v = 0 and moves by 0.
"""
from __future__ import annotations

import math

import torch

from common.fl.algorithms import Algorithm, register_algorithm


class AdaptiveServerOptimizer(torch.optim.Optimizer):
    """The authors' server step (see the module docstring); subclasses supply the second moment and the bias correction.

    `tau` is Keras' `epsilon`; the accumulator v starts at 0 for all three (the authors' initial accumulator value)."""
    bias_correction = True   # Adam and Yogi: step size eta * sqrt(1 - beta2^t) / (1 - beta1^t)

    def __init__(self, params, lr: float, beta1: float, beta2: float, tau: float):
        if lr < 0 or tau <= 0 or not 0 <= beta1 < 1 or not 0 <= beta2 < 1:
            raise ValueError(f"invalid hyper-parameters lr={lr}, beta1={beta1}, beta2={beta2}, tau={tau}")
        super().__init__(params, {"lr": lr, "beta1": beta1, "beta2": beta2, "tau": tau})

    @staticmethod
    def second_moment(v: torch.Tensor, g_sq: torch.Tensor, beta2: float) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, beta1, beta2, tau = group["lr"], group["beta1"], group["beta2"], group["tau"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["m"] = torch.zeros_like(p)
                    state["v"] = torch.zeros_like(p)   # initial accumulator 0 (Keras Adam; the authors' flags)
                state["step"] += 1
                t = state["step"]
                m = state["m"].mul_(beta1).add_(g, alpha=1 - beta1)   # beta1 = 0: m = g
                state["v"] = self.second_moment(state["v"], g * g, beta2)
                step_size = lr * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t) if self.bias_correction else lr
                p.addcdiv_(m, state["v"].sqrt().add_(tau), value=-step_size)


class AdagradServer(AdaptiveServerOptimizer):
    """Keras (OptimizerV2) Adagrad with initial_accumulator_value = 0 and epsilon = tau when beta1 = 0."""
    bias_correction = False

    @staticmethod
    def second_moment(v, g_sq, beta2):
        return v + g_sq


class AdamServer(AdaptiveServerOptimizer):
    """Keras (OptimizerV2) Adam with epsilon = tau."""

    @staticmethod
    def second_moment(v, g_sq, beta2):
        return beta2 * v + (1 - beta2) * g_sq


class YogiServer(AdaptiveServerOptimizer):
    """The authors' Yogi (utils/optimizers/yogi.py) with initial_accumulator_value = 0 and epsilon = tau."""

    @staticmethod
    def second_moment(v, g_sq, beta2):
        return v + (1 - beta2) * torch.sign(g_sq - v) * g_sq


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
