"""Algorithms whose clients keep part of the model to themselves across rounds.

`LocalEntries` is FedAvg in which the state entries named by `is_local` never leave the client: each client
trains from the global model overlaid with its own local entries, and the server averages only the other
entries. Each client is evaluated with its own model. Subclasses choose what stays local: everything
(`SingleSet`, local training only), or the BatchNorm layers (FedBN, papers/fedbn/method.py).
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
        """Each client's own model: on its domain's test data (one client per domain) or, without domains, on
        the whole test set, averaged over clients."""
        from common.fl.engine import evaluate, evaluate_domains
        model = run.ctx.model

        def own_model(client: int) -> torch.nn.Module:
            model.load_state_dict(self.client_state(global_state, client))
            return model

        if run.test_domain is not None:
            client_of = client_of_domain(run.ctx.data.train.domain, run.ctx.parts, len(run.ctx.data.domains))
            return evaluate_domains(run, lambda d: own_model(client_of[d]))
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
