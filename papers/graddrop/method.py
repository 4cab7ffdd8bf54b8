"""Gradient Dropping (Aji & Heafield, "Sparse Communication for Distributed Gradient Descent", EMNLP 2017).

Data-parallel SGD over N workers is the engine's loop with every worker a client, all clients in every round and
one local SGD step per round (`training.local_steps: 1`): worker k computes the step u_k = lr * g_k on its
minibatch from the shared weights w, the server applies the mean of the workers' steps, and every worker continues
from the new w. The dense baseline is FedAvg in that configuration (each worker sends its whole step).

With gradient dropping, worker k adds its residual e_k (what it dropped before) to its step, v = u_k + e_k, and
sends only the entries of v whose magnitude lies above a threshold, as (index, value) pairs; the dropped entries
become the new residual, e_k <- v where dropped, 0 where sent. The threshold drops the drop_ratio (R) smallest
magnitudes of each layer (weight or bias tensor): it is the R-quantile of the magnitudes of a random sample of the
layer's entries (sample_fraction of them, at least min_sample, all of them for small layers), as in the paper,
which samples 0.1% to avoid sorting. With `layer_normalisation`, each layer's v is divided by its root mean square
before one threshold is chosen over all layers (so layers of small gradients are not starved); `residual: false`
is the ablation that forgets what was dropped.

The server receives the kept entries; the worker's transmitted model is w - v on them and w elsewhere. It is
computed as (w - u_k) - e_k, the worker's own trained weights less its residual (equal in exact arithmetic), so that
with R = 0 (every entry kept, no residual) it is the worker's trained model itself and the run equals the dense
baseline bit for bit. The server averages the transmitted models (FedAvg's server), i.e. applies the mean of the
sparse steps, and broadcasts that mean step: the union of the round's kept positions as (index, value) pairs (dense
when that is smaller); the first round's download is the initial model, dense.
"""
from __future__ import annotations

import math

import torch

from common.fl.algorithms import Algorithm, State, register_algorithm
from common.fl.communication import sparse_bytes, state_bytes
from common.fl.engine import sub_seed


def drop_threshold(magnitudes: torch.Tensor, drop_ratio: float, sample_fraction: float, min_sample: int,
                   generator: torch.Generator) -> float:
    """The magnitude at or below which the drop_ratio smallest entries of `magnitudes` (1-D) are dropped, estimated
    from a random sample of max(min_sample, sample_fraction * n) entries (all of them when that is n or more)."""
    n = magnitudes.numel()
    m = min(n, max(min_sample, math.ceil(sample_fraction * n)))
    sample = magnitudes if m == n else magnitudes[torch.randint(n, (m,), generator=generator)]
    k = math.floor(drop_ratio * m)
    if k == 0:
        return -math.inf  # nothing dropped
    return sample.kthvalue(k).values.item()


def keep_mask(values: list[torch.Tensor], drop_ratio: float, layer_normalisation: bool, sample_fraction: float,
              min_sample: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Per tensor, True where the entry is sent: its magnitude lies above its layer's threshold (or, with
    layer_normalisation, its magnitude over its layer's RMS lies above one threshold for all layers)."""
    if drop_ratio == 0:
        return [torch.ones_like(v, dtype=torch.bool) for v in values]
    if layer_normalisation:
        scaled = [v.abs() / v.pow(2).mean().sqrt().clamp_min(1e-30) for v in values]
        threshold = drop_threshold(torch.cat([s.flatten() for s in scaled]), drop_ratio, sample_fraction,
                                   min_sample, generator)
        return [s > threshold for s in scaled]
    return [v.abs() > drop_threshold(v.abs().flatten(), drop_ratio, sample_fraction, min_sample, generator)
            for v in values]


@register_algorithm("graddrop")
class GradientDropping(Algorithm):
    def __init__(self, drop_ratio: float = 0.99, residual: bool = True, layer_normalisation: bool = False,
                 sample_fraction: float = 0.001, min_sample: int = 1000, server_lr: float = 1.0):
        super().__init__(server_lr=server_lr)
        if not 0 <= drop_ratio < 1:
            raise ValueError(f"drop_ratio must lie in [0, 1), got {drop_ratio}")
        self.drop_ratio, self.residual, self.layer_normalisation = drop_ratio, residual, layer_normalisation
        self.sample_fraction, self.min_sample = sample_fraction, min_sample

    def setup(self, ctx):
        super().setup(ctx)
        self.residuals: dict[int, list[torch.Tensor]] = {}  # worker -> what it has dropped and not yet sent
        self.kept: dict[int, int] = {}  # worker -> entries it sent this round
        self.sent_masks: list[list[torch.Tensor]] = []  # this round's kept positions, per worker
        self.broadcast_entries: int | None = None  # positions of the last mean step (None: nothing broadcast yet)
        self.rounds_done = 0

    # --- client side -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def end_client(self, model, global_state, client, steps):
        params = list(model.parameters())
        steps_taken = [global_state[n] - p for n, p in zip(self.param_names, params)]  # u_k
        old = self.residuals.get(client) if self.residual else None
        values = steps_taken if old is None else [u + e for u, e in zip(steps_taken, old)]
        gen = torch.Generator().manual_seed(sub_seed(self.ctx.spec["seed"], self.rounds_done, client, 0x6D0F))
        masks = keep_mask(values, self.drop_ratio, self.layer_normalisation, self.sample_fraction, self.min_sample,
                          gen)
        for name, p, mask, i in zip(self.param_names, params, masks, range(len(params))):
            sent = p if old is None else p - old[i]  # w - (u_k + e_k), in the worker's own arithmetic
            p.copy_(torch.where(mask, sent, global_state[name]))
        if self.residual:
            self.residuals[client] = [torch.where(m, torch.zeros_like(v), v) for m, v in zip(masks, values)]
        self.kept[client] = int(sum(m.sum().item() for m in masks))
        self.sent_masks.append(masks)

    # --- communication -----------------------------------------------------------------------------------------
    def _buffer_keys(self, state: State) -> list[str]:
        return [k for k in state if k not in self.param_names]  # normalisation statistics: sent dense

    def upload_bytes(self, client_state, client, round_index):
        """The kept entries as (index, value) pairs; buffers (if any) dense."""
        value_bytes = client_state[self.param_names[0]].element_size()
        return sparse_bytes(self.kept[client], value_bytes) + state_bytes(client_state, self._buffer_keys(client_state))

    def download_bytes(self, global_state, client, round_index):
        """The initial model in the first round; afterwards the previous round's mean step, sparse or dense."""
        if self.broadcast_entries is None:
            return state_bytes(global_state)
        dense = state_bytes(global_state, self.param_names)
        value_bytes = global_state[self.param_names[0]].element_size()
        return min(dense, sparse_bytes(self.broadcast_entries, value_bytes)) + \
            state_bytes(global_state, self._buffer_keys(global_state))

    # --- server side -------------------------------------------------------------------------------------------
    def server_update(self, global_state, client_states, weights, round_index):
        new_state = super().server_update(global_state, client_states, weights, round_index)
        union = [torch.stack(ms).any(0) for ms in zip(*self.sent_masks)]
        self.broadcast_entries = int(sum(u.sum().item() for u in union))
        self.sent_masks = []
        self.rounds_done = round_index + 1
        return new_state
