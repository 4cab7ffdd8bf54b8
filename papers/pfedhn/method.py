"""pFedHN and pFedHN-PC (Shamsian et al. 2021): a server-side hypernetwork generates each client's model.

The hypernetwork h(v_i; phi) maps client i's learned embedding v_i through an MLP (Linear, then `n_hidden` times
ReLU + Linear, as the authors' CNNHyper) and one linear output layer (the authors' per-tensor heads side by side)
to the weights theta_i of the client's network. A client receives theta_i, trains it locally (the engine's local
SGD) to theta_i', and returns Delta = theta_i - theta_i'; the server sets the gradient of (phi, v_i) to
(d theta_i / d phi)^T Delta (`torch.autograd.grad` of the generated weights with `grad_outputs=Delta`, i.e. the
gradient of <h(v_i; phi), Delta>), clips its norm at 50 and takes an SGD step (momentum 0.9, weight decay), right
after that client: the clients of a round update the hypernetwork one after another. There is no averaged model.
pFedHN-PC: the classifier head is personal (kept and trained by the client, `LocalEntries`); the hypernetwork
generates the rest. Each client is evaluated with its generated model (and head) on its own test split.
"""
from __future__ import annotations

import math

import torch

from common.fl.algorithms import Algorithm, register_algorithm
from common.fl.engine import sub_seed
from common.fl.personal import LocalEntries


class HyperNetwork:
    """The hypernetwork as a list of plain tensors (checkpointed like any algorithm state):
    [embeddings (clients x d), W_0, b_0, ..., W_n, b_n, W_out, b_out]; `generate(k)` is client k's weights."""

    def __init__(self, clients: int, embed_dim: int, hidden: int, n_hidden: int, shapes: dict[str, tuple],
                 generator: torch.Generator):
        def linear(fan_in, fan_out):  # torch.nn.Linear's default initialisation
            bound = 1 / math.sqrt(fan_in)
            return [(torch.rand(fan_out, fan_in, generator=generator) * 2 - 1) * bound,
                    (torch.rand(fan_out, generator=generator) * 2 - 1) * bound]
        self.shapes = {k: tuple(v) for k, v in shapes.items()}
        total = sum(math.prod(s) for s in self.shapes.values())
        params = [torch.randn(clients, embed_dim, generator=generator)]  # torch.nn.Embedding's initialisation
        params += linear(embed_dim, hidden)
        for _ in range(n_hidden):
            params += linear(hidden, hidden)
        params += linear(hidden, total)
        self.params = [p.requires_grad_(True) for p in params]

    def generate(self, client: int) -> dict[str, torch.Tensor]:
        p = self.params
        h = torch.nn.functional.linear(p[0][client], p[1], p[2])
        for i in range(3, len(p) - 2, 2):
            h = torch.nn.functional.linear(torch.relu(h), p[i], p[i + 1])
        flat = torch.nn.functional.linear(h, p[-2], p[-1])
        out, at = {}, 0
        for key, shape in self.shapes.items():
            n = math.prod(shape)
            out[key] = flat[at:at + n].view(shape)
            at += n
        return out


def hypernetwork_gradient(generated: dict[str, torch.Tensor], delta: dict[str, torch.Tensor],
                          params: list[torch.Tensor]) -> list[torch.Tensor]:
    """(d theta / d phi)^T Delta: the chain rule through the generated weights theta(phi)."""
    keys = list(generated)
    return list(torch.autograd.grad([generated[k] for k in keys], params, grad_outputs=[delta[k] for k in keys]))


@register_algorithm("pfedhn")
class PFedHN(LocalEntries):
    transient = Algorithm.transient + ("_pending", "hnet")

    def __init__(self, hn_lr: float = 0.01, embed_lr: float | None = None, embed_dim: int = -1, hidden: int = 100,
                 n_hidden: int = 3, momentum: float = 0.9, weight_decay: float = 1e-3, clip: float = 50.0,
                 personal_classifier: bool = False):
        super().__init__()
        self.hn_lr, self.embed_lr, self.embed_dim = hn_lr, embed_lr, embed_dim
        self.hidden, self.n_hidden, self.momentum, self.weight_decay, self.clip = hidden, n_hidden, momentum, weight_decay, clip
        self.personal_classifier = personal_classifier

    def is_local(self, model, key):
        return self.personal_classifier and key.startswith("head.")

    def setup(self, ctx):
        super().setup(ctx)
        clients = len(ctx.parts)
        shapes = {n: tuple(p.shape) for n, p in ctx.model.named_parameters() if n not in self.local_keys}
        dim = int(1 + clients / 4) if self.embed_dim == -1 else self.embed_dim  # the authors' default size
        gen = torch.Generator().manual_seed(sub_seed(ctx.spec["seed"], 0x4E7))
        self.hnet = HyperNetwork(clients, dim, self.hidden, self.n_hidden, shapes, gen)
        emb, rest = self.hnet.params[0], self.hnet.params[1:]
        self.hn_opt = torch.optim.SGD([{"params": rest}, {"params": [emb], "lr": self.embed_lr or self.hn_lr}],
                                      lr=self.hn_lr, momentum=self.momentum, weight_decay=self.weight_decay)

    def checkpoint_state(self):
        state = super().checkpoint_state()
        state["attributes"]["hnet"] = list(self.hnet.params)
        return state

    def restore_checkpoint_state(self, state):
        params = state["attributes"].pop("hnet")
        super().restore_checkpoint_state(state)
        with torch.no_grad():
            for p, saved in zip(self.hnet.params, params):
                p.copy_(saved)

    def client_state(self, global_state, client):
        with torch.no_grad():
            generated = self.hnet.generate(client)
        return {**global_state, **generated, **self.local.get(client, {})}

    def begin_client(self, model, global_state, client):
        self._pending = self.hnet.generate(client)  # with its graph, for the update after local training
        model.load_state_dict({**global_state, **{k: v.detach() for k, v in self._pending.items()},
                               **self.local.get(client, {})})

    def end_client(self, model, global_state, client, steps):
        final = model.state_dict()
        delta = {k: v.detach() - final[k] for k, v in self._pending.items()}
        grads = hypernetwork_gradient(self._pending, delta, self.hnet.params)
        self._pending = None
        for p, g in zip(self.hnet.params, grads):
            p.grad = g
        torch.nn.utils.clip_grad_norm_(self.hnet.params, self.clip)
        self.hn_opt.step()
        self.hn_opt.zero_grad(set_to_none=True)
        super().end_client(model, global_state, client, steps)  # the personal head, if any, stays with the client

    def server_update(self, global_state, client_states, weights, round_index):
        return global_state  # nothing is averaged: the hypernetwork was updated after each client
