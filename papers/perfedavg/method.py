"""Per-FedAvg (Fallah et al. 2020): FedAvg on the MAML objective F_i(w) = f_i(w - alpha * grad f_i(w)).

Each local step of client i takes independent batches D, D' (and D'' for HF) of its data and moves
    w <- w - beta * (I - alpha * H_i(w; D'')) grad f_i(w - alpha * grad f_i(w; D); D')
(the training learning rate is beta). FO drops the Hessian term; HF computes the Hessian-vector product exactly with
autograd (double back-propagation), the paper's HF variant approximates it by a finite difference of gradients.
The server averages the clients' models as FedAvg does. Evaluation (the engine's per-client evaluation with
`evaluation.adapt_steps: 1`, `adapt_lr: alpha`): each client's copy of the global model after one gradient step on
its own training data, on its own test split; "FedAvg + update" is FedAvg with the same evaluation.
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from common.errors import SuiteError
from common.fl.algorithms import Algorithm, register_algorithm
from common.fl.engine import sub_seed


def hessian_vector_product(loss: torch.Tensor, params: list[torch.Tensor], vector: list[torch.Tensor]) -> list[torch.Tensor]:
    """H v, H the Hessian of `loss` with respect to `params`: the gradient of <grad loss, v> (Pearlmutter's trick)."""
    grads = torch.autograd.grad(loss, params, create_graph=True)
    return list(torch.autograd.grad(grads, params, grad_outputs=vector))


def meta_step(model: torch.nn.Module, loss_fn, batches, alpha: float, beta: float, hessian: bool) -> float:
    """One Per-FedAvg step in place on `model`'s parameters; `batches` is (D, D') for FO, (D, D', D'') for HF,
    each an (x, y) pair, `loss_fn(model, x, y)` the client's loss. Returns the loss at the adapted point on D'."""
    params = [p for p in model.parameters() if p.requires_grad]
    w = [p.detach().clone() for p in params]
    g_in = torch.autograd.grad(loss_fn(model, *batches[0]), params)
    with torch.no_grad():  # the adapted point w - alpha * grad f(w; D)
        for p, g in zip(params, g_in):
            p.sub_(alpha * g)
    outer = loss_fn(model, *batches[1])
    g_out = torch.autograd.grad(outer, params)
    with torch.no_grad():
        for p, wi in zip(params, w):
            p.copy_(wi)
    if hessian:  # (I - alpha H(w; D'')) g_out
        hv = hessian_vector_product(loss_fn(model, *batches[2]), params, [g.detach() for g in g_out])
        g_out = [g - alpha * h for g, h in zip(g_out, hv)]
    with torch.no_grad():
        for p, g in zip(params, g_out):
            p.sub_(beta * g)
    return outer.item()


@register_algorithm("perfedavg")
class PerFedAvg(Algorithm):
    def __init__(self, alpha: float = 0.01, variant: str = "fo", server_lr: float = 1.0):
        if variant not in ("fo", "hf"):
            raise SuiteError(f"Per-FedAvg variant must be 'fo' or 'hf', got '{variant}'")
        super().__init__(server_lr=server_lr)
        self.alpha, self.variant = alpha, variant

    def train_client(self, run, client, round_index):
        """Local meta-steps on consecutive minibatches of the round's permutations of the client's data, each step
        taking 2 (FO) or 3 (HF) batches: as many steps as FedAvg takes in `local_epochs` passes (batches per epoch x
        epochs), or `local_steps`; the batches run through 2 (3) times as many passes."""
        model = run.ctx.model
        gen = torch.Generator().manual_seed(sub_seed(run.seed, round_index, client))
        beta = run.lr if run.lr_decay == 1.0 else run.lr * run.lr_decay ** round_index
        run.ctx.round_lr = beta
        need = 3 if self.variant == "hf" else 2
        per_epoch = math.ceil(len(run.ctx.parts[client]) / run.batch_size)
        steps = run.local_steps or per_epoch * run.epochs
        batches = run.client_batches(client, math.ceil(steps * need / per_epoch), gen)
        model.train()
        total = 0.0
        for s in range(steps):
            group = list(itertools.islice(batches, need))
            total += meta_step(model, self.local_loss, group, self.alpha, beta, self.variant == "hf")
            if not math.isfinite(total):
                return total, s + 1
        return total / steps, steps

    def local_loss(self, model, x, y):
        return F.cross_entropy(model(x), y)
