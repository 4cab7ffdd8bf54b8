"""FedPer: FedAvg in which the last `personal_layers` layers (the personalisation layers W_P) stay on each client.

The base layers W_B are averaged by the server with weights n_j / sum n (Algorithm 1 of the paper); the
personalisation layers are trained with them on the client and never sent. A client is evaluated with the global
base and its own personalisation layers, on its own test split (`evaluation.per_client`).
"""
from __future__ import annotations

from common.fl.algorithms import register_algorithm
from common.fl.personal import LocalEntries, last_layers_keys


@register_algorithm("fedper")
class FedPer(LocalEntries):
    def __init__(self, personal_layers: int = 1, server_lr: float = 1.0):
        super().__init__(server_lr=server_lr)
        self.personal_layers = personal_layers

    def setup(self, ctx):
        self._personal_keys = last_layers_keys(ctx.model, self.personal_layers)
        super().setup(ctx)

    def is_local(self, model, key):
        return key in self._personal_keys
