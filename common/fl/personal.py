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
