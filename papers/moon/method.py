"""MOON's local objective: cross-entropy plus the model-contrastive loss (Li, He, Song, CVPR 2021, Eq. 3-4).

For a batch, z is the local model's representation (the projection head's output), z_glob that of the global model
the client received this round and z_prev that of the client's own model after its previous local training:

    l_con = -log( exp(sim(z, z_glob)/tau) / (exp(sim(z, z_glob)/tau) + exp(sim(z, z_prev)/tau)) ),
    loss  = CE(logits, y) + mu * l_con,                                  sim = cosine similarity.

The global and the previous model are frozen and used in eval mode, as in the paper's code. As in the paper's code
(QinbinLi/MOON, main.py: the pool of previous models is empty in the first round, then holds every party's network
after each round), no client has a negative in the first round (the contrastive term is zero), and from the second
round on a client that has not trained yet uses the initial network as its previous model. Here that is the
initial global model (the authors' code initialises each party's network independently, so there it is the
party's own random initialisation). Clients keep their previous model between rounds; the previous models and the
initial one are part of the algorithm's checkpointed state, so a resumed run ends bit-identical. The server is
FedAvg's.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from common.fl.algorithms import Algorithm, State, register_algorithm


def model_contrastive_loss(z: torch.Tensor, z_glob: torch.Tensor, z_prev: torch.Tensor | None,
                           tau: float) -> torch.Tensor:
    """Mean over the batch of l_con; the positive is z_glob, the negative z_prev (none: zero loss)."""
    if z_prev is None:
        return z.new_zeros(())
    logits = torch.stack([F.cosine_similarity(z, z_glob, dim=-1), F.cosine_similarity(z, z_prev, dim=-1)], 1) / tau
    return F.cross_entropy(logits, torch.zeros(len(z), dtype=torch.long, device=z.device))


@register_algorithm("moon")
class Moon(Algorithm):
    transient = Algorithm.transient + ("global_model", "prev_model", "has_prev")

    def __init__(self, mu: float = 5.0, tau: float = 0.5, server_lr: float = 1.0):
        super().__init__(server_lr=server_lr)
        self.mu, self.tau = mu, tau

    def setup(self, ctx):
        super().setup(ctx)
        # Scratch copies (no random initialisation consumed): loaded with the global / previous state per client.
        self.global_model = copy.deepcopy(ctx.model).eval().requires_grad_(False)
        self.prev_model = copy.deepcopy(ctx.model).eval().requires_grad_(False)
        self.prev: dict[int, State] = {}  # client -> its model after its last local training
        self.initial: State = {k: v.detach().clone() for k, v in ctx.model.state_dict().items()}  # before training
        self.rounds_done = 0

    def begin_client(self, model, global_state, client):
        self.global_model.load_state_dict(global_state)
        self.has_prev = self.rounds_done > 0  # the first round has no negative
        if self.has_prev:
            self.prev_model.load_state_dict(self.prev.get(client, self.initial))

    def local_loss(self, model, x, y):
        z = model.features(x)
        ce = F.cross_entropy(model.head(z), y)
        with torch.no_grad():
            z_glob = self.global_model.features(x)
            z_prev = self.prev_model.features(x) if self.has_prev else None
        return ce + self.mu * model_contrastive_loss(z, z_glob, z_prev, self.tau)

    def end_client(self, model, global_state, client, steps):
        self.prev[client] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def server_update(self, global_state, client_states, weights, round_index):
        new_state = super().server_update(global_state, client_states, weights, round_index)
        self.rounds_done = round_index + 1
        return new_state
