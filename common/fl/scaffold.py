"""SCAFFOLD (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning").

Clients correct their local gradient with control variates, g_i(y) - c_i + c, which removes the client drift
that heterogeneous data causes in FedAvg. After K local steps, client i updates its control variate with the
paper's option II,

    c_i+ = c_i - c + (x - y_i) / (K_eff * lr_r),      K_eff = (K - rho (1 - rho^K) / (1 - rho)) / (1 - rho),

and the server moves the model and its own control variate,

    x <- x + server_lr * mean_i(y_i - x),        c <- c + |S|/N * mean_i(c_i+ - c_i).

Option II divides the client's displacement x - y_i by the distance K steps move per unit of gradient, so that
(x - y_i) / (K_eff * lr_r) estimates the client's mean (corrected) gradient. The paper's plain SGD moves K * eta_l;
the engine's local SGD has heavy-ball momentum rho (its buffer restarted every round; the correction is added to the
gradient through the loss, so it goes through the buffer too) and the round's learning rate lr_r = lr * lr_decay^r.
For a constant gradient g, step k moves lr_r * g * (1 - rho^k) / (1 - rho), so K steps move lr_r * g * K_eff with
K_eff as above (K_eff = K without momentum; about K / (1 - rho) for large K). Dividing by K * lr instead
overestimates the gradient by up to 1 / (1 - rho) (tenfold at rho = 0.9); the overestimate feeds back through
the correction, the control variates grow every round and the run diverges. K_eff * lr_r is the divisor of the
FedNTD authors' SCAFFOLD trainer (github.com/Lee-Gihun/FedNTD, algorithms/scaffold/ClientTrainer.py, with
adaptive_divison, the learning rate read from the round's optimiser).

The model average is the engine's sample-weighted one (the paper's unweighted mean when clients hold equally much
data); the control-variate average is unweighted, as in the paper. Control variates exist for the trainable
parameters only; normalisation statistics are averaged like in FedAvg.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from common.fl.algorithms import Algorithm, register_algorithm
from common.fl.communication import dense_bytes


def effective_steps(steps: int, momentum: float) -> float:
    """K_eff: how far `steps` SGD steps with heavy-ball momentum (buffer starting at zero, no dampening) move per
    unit of a constant gradient and learning rate; `steps` itself without momentum."""
    if momentum == 0:
        return float(steps)
    return (steps - momentum * (1 - momentum ** steps) / (1 - momentum)) / (1 - momentum)


@register_algorithm("scaffold")
class Scaffold(Algorithm):
    def __init__(self, server_lr: float = 1.0):
        super().__init__(server_lr=server_lr)

    def setup(self, ctx):
        super().setup(ctx)
        self.c = [torch.zeros_like(p) for p in self.server_params]  # server control variate
        self.c_clients: dict[int, list[torch.Tensor]] = {}  # c_i of every client that has trained; absent = 0
        self.c_deltas: list[list[torch.Tensor]] = []  # c_i+ - c_i of this round's clients

    def download_bytes(self, global_state, client, round_index):
        """The global model and the server's control variate c."""
        return super().download_bytes(global_state, client, round_index) + dense_bytes(self.c)

    def upload_bytes(self, client_state, client, round_index):
        """The client's model and the change of its control variate, c_i+ - c_i."""
        return super().upload_bytes(client_state, client, round_index) + dense_bytes(self.c)

    def client_variate(self, client: int) -> list[torch.Tensor]:
        return self.c_clients.get(client) or [torch.zeros_like(c) for c in self.c]

    def begin_client(self, model, global_state, client):
        self.correction = [c - ci for c, ci in zip(self.c, self.client_variate(client))]

    def local_loss(self, model, x, y):
        ce = F.cross_entropy(model(x), y)
        # <c - c_i, w> adds c - c_i to the gradient; subtracting its detached value keeps the reported training
        # loss the plain cross-entropy.
        linear = sum((d * p).sum() for d, p in zip(self.correction, model.parameters()))
        return ce + (linear - linear.detach())

    @torch.no_grad()
    def end_client(self, model, global_state, client, steps):
        if steps == 0:  # no local step: nothing to learn about this client's gradient
            return
        t = self.ctx.spec["training"]
        # the round's learning rate; the spec's when the hook is called without the engine's local training
        lr = self.ctx.round_lr if self.ctx.round_lr is not None else t["lr"]
        divisor = effective_steps(steps, t.get("momentum", 0.0)) * lr
        old = self.client_variate(client)
        new = [ci - c + (global_state[name] - p.detach()) / divisor
               for ci, c, name, p in zip(old, self.c, self.param_names, model.parameters())]
        self.c_clients[client] = new
        self.c_deltas.append([n - o for n, o in zip(new, old)])

    def server_update(self, global_state, client_states, weights, round_index):
        new_state = super().server_update(global_state, client_states, weights, round_index)
        n_clients = len(self.ctx.parts)
        with torch.no_grad():
            for k, c in enumerate(self.c):
                # |S|/N * mean over the round's clients = sum / N
                c += sum(d[k] for d in self.c_deltas) / n_clients
        self.c_deltas = []
        return new_state
