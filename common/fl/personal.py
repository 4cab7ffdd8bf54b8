"""Algorithms whose clients keep part of the model to themselves across rounds.

`LocalEntries` is FedAvg in which the state entries named by `is_local` never leave the client: each client
trains from the global model overlaid with its own local entries, and the server averages only the other
entries. Each client is evaluated with its own model. Subclasses choose what stays local: everything
(`SingleSet`, local training only), the BatchNorm layers (FedBN, papers/fedbn/method.py), the last layers
(FedPer, papers/fedper/method.py), all but the last layers (LG-FedAvg, below), or the personal classifier of
pFedHN-PC (papers/pfedhn/method.py). How a client is evaluated is the engine's per-client evaluation
(`common.fl.engine.evaluate_clients`) with the model `client_state` gives it.
"""
from __future__ import annotations

import numpy as np
import torch

from common.errors import SuiteError
from common.fl.algorithms import Algorithm, State, register_algorithm


class LocalEntries(Algorithm):
    """Base class: clients keep the entries for which `is_local` holds; the server averages the rest."""

    def is_local(self, model: torch.nn.Module, key: str) -> bool:
        raise NotImplementedError

    def setup(self, ctx):
        super().setup(ctx)
        self.local_keys = [k for k in ctx.model.state_dict() if self.is_local(ctx.model, k)]
        self.local: dict[int, State] = {}  # client -> its local entries after its last local training

    def transmitted_keys(self, state):
        """Only the shared entries travel; the local ones never leave the client."""
        return [k for k in state if k not in self.local_keys]

    def client_state(self, global_state: State, client: int) -> State:
        """The client's model: the global state with its own local entries (the global ones before it trained)."""
        return {**global_state, **self.local.get(client, {})}

    def begin_client(self, model, global_state, client):
        if client in self.local:
            model.load_state_dict(self.client_state(global_state, client))

    def end_client(self, model, global_state, client, steps):
        state = model.state_dict()
        self.local[client] = {k: state[k].detach().clone() for k in self.local_keys}

    def server_update(self, global_state, client_states, weights, round_index):
        new = super().server_update(global_state, client_states, weights, round_index)
        # local entries are never averaged: the global state keeps its own values for them
        return {k: global_state[k] if k in self.local_keys else v for k, v in new.items()}

    def evaluate(self, run, global_state):
        """Each client's own model (`client_state`): on its own test split when the run evaluates per client
        (`evaluation.per_client`, and always on multi-domain data: FedBN), otherwise on the whole test set; the
        mean over clients."""
        from common.fl.engine import evaluate, evaluate_clients
        model = run.ctx.model

        def own_model(client: int | None) -> torch.nn.Module:
            if client is None:  # a domain no single client holds
                raise SuiteError(run.unit_client_error)
            model.load_state_dict(self.client_state(global_state, client))
            return model

        if run.per_client:
            return evaluate_clients(run, own_model)
        results = [evaluate(own_model(k), run.x_test, run.y_test) for k in range(len(run.ctx.parts))]
        return {"test_accuracy": float(np.mean([a for a, _ in results])),
                "test_loss": float(np.mean([l for _, l in results])),
                "client_accuracy": [a for a, _ in results]}


def client_of_domain(train_domain: torch.Tensor, parts: list[torch.Tensor], n_domains: int) -> list[int]:
    """The client that holds each domain; personalised per-domain evaluation needs one client per domain."""
    owner = {}
    for k, idx in enumerate(parts):
        held = torch.unique(train_domain[idx]).tolist()
        if len(held) != 1 or held[0] in owner:
            raise SuiteError("evaluating each client's own model on its domain needs one client per domain "
                             "(partition scheme 'domain')")
        owner[held[0]] = k
    if len(owner) != n_domains:
        raise SuiteError(f"{n_domains - len(owner)} domain(s) held by no client; use partition scheme 'domain'")
    return [owner[d] for d in range(n_domains)]


@register_algorithm("singleset")
class SingleSet(LocalEntries):
    """Local training only, no communication ("SingleSet" in FedBN, "SOLO" in MOON): every entry stays local."""

    def is_local(self, model, key):
        return True


def parametrised_layers(model: torch.nn.Module) -> list[str]:
    """Names of the modules that own parameters directly (convolutions, linear layers, norms), in the order the
    model defines them: for a `Classifier` the feature layers first, the head last."""
    return [name for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]


def last_layers_keys(model: torch.nn.Module, depth: int) -> set[str]:
    """State-dict keys of the last `depth` parametrised layers (the head is the last one)."""
    layers = parametrised_layers(model)
    if not 1 <= depth <= len(layers):
        raise SuiteError(f"depth {depth} must be between 1 and the model's {len(layers)} parametrised layers")
    last = set(layers[-depth:])
    return {k for k in model.state_dict() if k.rsplit(".", 1)[0] in last}


@register_algorithm("lgfedavg")
class LGFedAvg(LocalEntries):
    """LG-FedAvg (Liang et al. 2020): local representation, global head. Every layer but the last
    `global_layers` stays on its client; the server averages the last `global_layers` (sample-weighted)."""

    def __init__(self, global_layers: int = 1, server_lr: float = 1.0):
        super().__init__(server_lr=server_lr)
        self.global_layers = global_layers

    def setup(self, ctx):
        self._global_keys = last_layers_keys(ctx.model, self.global_layers)
        super().setup(ctx)

    def is_local(self, model, key):
        return key not in self._global_keys


def moreau_step(model: torch.nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor, anchor: list[torch.Tensor],
                personal_lr: float, lam: float, mu: float, steps: int) -> float:
    """pFedMe's inner problem, solved approximately in place on `model`'s parameters θ: `steps` gradient steps
    θ <- θ - personal_lr (∇f(θ; x, y) + λ (θ - w) + μ θ) on the one batch (x, y), w = `anchor` (the client's local
    model). Returns the last step's loss f(θ; x, y)."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = torch.zeros(())
    for _ in range(steps):
        loss = loss_fn(model, x, y)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g, w in zip(params, grads, anchor):
                p.sub_(personal_lr * (g + lam * (p - w) + mu * p))
    return loss.item()


@register_algorithm("pfedme")
class PFedMe(Algorithm):
    """pFedMe (Dinh, Tran, Nguyen, NeurIPS 2020), as the authors' code runs it (github CharlieDinh/pFedMe): each
    client keeps a personalised model θ_i, the approximate minimiser of the Moreau envelope
    f_i(θ) + λ/2 ||θ - w_i||^2 of its loss around its local copy w_i of the global model. Per local step, on one batch:
    K steps θ <- θ - personal_lr (∇f_i(θ) + λ (θ - w_i) + μ θ) from where θ is (the global model at the round's
    start), then w_i <- w_i - lr λ (w_i - θ) (lr: the schedule's client learning rate); as many local steps as FedAvg
    takes batches. The client sends w_i; the server mixes the sample-weighted mean of the w_i into the global model
    with β: w <- (1 - β) w + β mean (`server_lr` = β: the base class's server step is exactly this mixing). Each
    client is evaluated with its θ_i after its last local training (before it first trains: the global model)."""

    def __init__(self, lam: float = 15.0, K: int = 5, personal_lr: float = 0.09, mu: float = 0.001,
                 beta: float = 1.0):
        super().__init__(server_lr=beta)
        if K < 1:
            raise SuiteError(f"pFedMe needs K >= 1 inner steps, got {K}")
        self.lam, self.K, self.personal_lr, self.mu = lam, K, personal_lr, mu
        self.personal: dict[int, State] = {}  # client -> its θ_i after its last local training

    def train_client(self, run, client, round_index):
        import itertools
        import math

        from common.fl.engine import sub_seed
        model = run.ctx.model
        gen = torch.Generator().manual_seed(sub_seed(run.seed, round_index, client))
        lr = run.lr if run.lr_decay == 1.0 else run.lr * run.lr_decay ** round_index
        run.ctx.round_lr = lr
        params = [p for p in model.parameters() if p.requires_grad]
        local = [p.detach().clone() for p in params]  # w_i, from the global model; θ starts there too
        per_epoch = math.ceil(len(run.ctx.parts[client]) / run.batch_size)
        steps = run.local_steps or per_epoch * run.epochs
        batches = itertools.islice(run.client_batches(client, math.ceil(steps / per_epoch), gen), steps)
        model.train()
        total, done = 0.0, 0
        for x, y in batches:
            total += moreau_step(model, self.local_loss, x, y, local, self.personal_lr, self.lam, self.mu, self.K)
            done += 1
            with torch.no_grad():
                for w, p in zip(local, params):
                    w.sub_(lr * self.lam * (w - p))
            if not math.isfinite(total):
                break
        state = model.state_dict()
        self.personal[client] = {k: v.detach().clone() for k, v in state.items()}
        with torch.no_grad():  # the client sends w_i
            for p, w in zip(params, local):
                p.copy_(w)
        return total / max(done, 1), done

    def evaluate(self, run, global_state):
        """Each client's personalised model θ_i on its own test split (the authors' evaluate_personalized_model);
        the global model on the whole test set when the run does not evaluate per client."""
        from common.fl.engine import evaluate_clients
        if not run.per_client:
            return super().evaluate(run, global_state)
        model = run.ctx.model

        def personal_model(client: int | None) -> torch.nn.Module:
            if client is None:
                raise SuiteError(run.unit_client_error)
            model.load_state_dict({**global_state, **self.personal.get(client, {})})
            return model

        return evaluate_clients(run, personal_model)
