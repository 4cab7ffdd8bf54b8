"""FedKD (Wu, Wu, Lyu, Huang, Xie, Nature Communications 2022): adaptive mutual distillation between a large local
mentor and a small shared mentee, and the mentee's updates compressed by SVD with a rising energy threshold.

Each client k keeps a mentor (never transmitted) and trains it jointly with its copy of the shared mentee on its
data. With task losses L_t = CE(mentor), L_s = CE(mentee) and the adaptive weight w = 1 / (L_t + L_s) (small when
either model is wrong), the joint objective is (Eqs. 1-6 of the paper)

    L = L_t + L_s + w * [KL(p_s || p_t) + KL(p_t || p_s) + 2 * L_h],

where KL(p_s || p_t) trains the mentor towards the mentee's (detached) prediction and KL(p_t || p_s) the mentee
towards the mentor's, and L_h, the hidden-state and attention alignment, is the sum over the mentee's blocks of
MSE(H_t, H_s) + MSE(A_t, A_s), mentee block -1-l aligned with mentor block -1-l*(depth_t // depth_s) (the authors'
code), counted once in each model's loss as in the paper and the code. `adaptive: false` is the ablation w = 1.

Communication: after local training the client sends its mentee update (trained minus received weights). Every
2-D weight matrix M (m x n) of the update is factorised, M = U diag(s) V^T, and truncated at the smallest k whose
energy fraction sum(s[:k]^2) / sum(s^2) reaches T(t); the factors U[:, :k], s[:k], V[:k] are sent
(k (m + n + 1) float32 values), or the matrix densely when that is smaller (then exactly). A convolution's kernel
(out, in, kh, kw) is factorised as the (out, in kh kw) matrix. Vectors (biases, LayerNorm) are sent dense. The server averages the reconstructed updates, factorises the mean with the same
threshold and broadcasts it the same way; every client adds it to the mentee. T(t) = T_start + (T_end - T_start)
(t + 1) / R for round t of R (the authors' schedule, 0.95 -> 0.98). `svd: false` sends updates densely.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from common.errors import SuiteError
from common.fl.algorithms import Algorithm, State, register_algorithm, task_loss
from common.fl.communication import dense_bytes
from common.fl.engine import clone_state, evaluate_clients, minimise, sub_seed
from common.models import build_model

# --- the paper's maths ------------------------------------------------------------------------------------------


def energy_threshold(round_index: int, rounds: int, t_start: float = 0.95, t_end: float = 0.98) -> float:
    """T(t) for round t (0-based) of `rounds`: rises linearly from T_start to T_end, reached in the last round."""
    return t_start + (t_end - t_start) * (round_index + 1) / rounds


def kept_rank(singular_values: torch.Tensor, energy: float) -> int:
    """The smallest k with sum(s[:k]^2) >= energy * sum(s^2) (s sorted descending); 0 for a zero matrix."""
    e = singular_values.double() ** 2
    total = e.sum()
    if total == 0:
        return 0
    cumulative = torch.cumsum(e, 0)
    k = int(torch.searchsorted(cumulative, energy * total, right=False)) + 1  # first index reaching it, 1-based
    return min(k, len(e))


def svd_compress(matrix: torch.Tensor, energy: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_k, s_k, Vh_k): the factors of `matrix` truncated at the energy threshold (torch.linalg.svd, reduced)."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    k = kept_rank(s, energy)
    return u[:, :k], s[:k], vh[:k]


def factor_values(shape: tuple[int, int], rank: int) -> int:
    """Values in the factors of a rank-`rank` truncation of an m x n matrix: k (m + n + 1)."""
    return rank * (shape[0] + shape[1] + 1)


def compress_update(update: dict[str, torch.Tensor], energy: float | None
                    ) -> tuple[dict[str, torch.Tensor], int, dict[str, int]]:
    """What a party sends of an update {name: tensor}, its byte count and the rank kept per matrix: each matrix as
    its truncated SVD factors (reconstructed here as U_k diag(s_k) Vh_k) or densely (rank -1) when the factors would
    be larger or `energy` is None; other tensors dense."""
    out, sent, ranks = {}, 0, {}
    for name, m in update.items():
        if energy is not None and m.ndim >= 2:
            matrix = m.reshape(m.shape[0], -1)  # a convolution's kernel as (out channels, in channels x taps)
            u, s, vh = svd_compress(matrix, energy)
            values = factor_values(tuple(matrix.shape), len(s))
            if values < m.numel():
                out[name] = ((u * s) @ vh).reshape(m.shape)
                sent += values * m.element_size()
                ranks[name] = len(s)
                continue
            ranks[name] = -1
        out[name] = m.clone()
        sent += dense_bytes([m])
    return out, sent, ranks


def mutual_distillation_loss(logits_t: torch.Tensor, logits_s: torch.Tensor, y: torch.Tensor,
                             hidden_t: list[torch.Tensor] = (), hidden_s: list[torch.Tensor] = (),
                             attn_t: list[torch.Tensor] = (), attn_s: list[torch.Tensor] = (),
                             adaptive: bool = True) -> torch.Tensor:
    """The joint loss of mentor (t) and mentee (s) on one batch (see the module's docstring); hidden_* and attn_*
    are the aligned blocks' hidden states and attention probabilities, mentor's and mentee's in the same order."""
    task_t, task_s = F.cross_entropy(logits_t, y), F.cross_entropy(logits_s, y)
    weight = 1.0 / (task_t + task_s) if adaptive else 1.0
    log_t, log_s = F.log_softmax(logits_t, 1), F.log_softmax(logits_s, 1)
    kd_t = F.kl_div(log_t, log_s.detach(), reduction="batchmean", log_target=True)  # KL(p_s || p_t): mentor learns
    kd_s = F.kl_div(log_s, log_t.detach(), reduction="batchmean", log_target=True)  # KL(p_t || p_s): mentee learns
    align = sum((F.mse_loss(a, b) for a, b in zip(hidden_t, hidden_s)), logits_t.new_zeros(()))
    align = align + sum((F.mse_loss(a, b) for a, b in zip(attn_t, attn_s)), logits_t.new_zeros(()))
    return task_t + task_s + weight * (kd_t + kd_s + 2 * align)


def aligned_blocks(depth_t: int, depth_s: int) -> list[tuple[int, int]]:
    """(mentor block, mentee block) pairs, 0-based: mentee block -1-l with mentor block -1-l*(depth_t // depth_s)."""
    ratio = depth_t // depth_s
    return [(depth_t - 1 - l * ratio, depth_s - 1 - l) for l in range(depth_s)]


# --- encoder outputs --------------------------------------------------------------------------------------------


def is_text_encoder(model: torch.nn.Module) -> bool:
    return hasattr(getattr(model, "features", None), "encoder") and hasattr(model.features.encoder, "config")


def encoder_outputs(model: torch.nn.Module, ids: torch.Tensor, want_internals: bool):
    """(logits, hidden states of each block, attention probabilities of each block) of a `pretrained_encoder`
    classifier, pooled as its forward pass pools (mean over non-padding tokens); internals empty when not wanted
    or when the model is not a text encoder (an image CNN: logits only)."""
    from common.models.text import PAD_ID
    if not is_text_encoder(model):
        return model(ids), [], []
    mask = ids != PAD_ID
    length = int(mask.sum(1).max())
    ids, maskf = ids[:, :length], mask[:, :length].to(torch.float32)
    out = model.features.encoder(input_ids=ids, attention_mask=maskf, output_hidden_states=want_internals,
                                 output_attentions=want_internals)
    hidden = out.last_hidden_state
    pooled = (hidden * maskf.unsqueeze(-1)).sum(1) / maskf.sum(1, keepdim=True)
    logits = model.head(pooled)
    if not want_internals:
        return logits, [], []
    return logits, list(out.hidden_states[1:]), list(out.attentions)


def depth(model: torch.nn.Module) -> int:
    return model.features.encoder.config.num_hidden_layers


# --- the algorithm ----------------------------------------------------------------------------------------------


def trainable_keys(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


@register_algorithm("fedkd")
class FedKD(Algorithm):
    """The engine's global model is the shared mentee; each client's mentor is kept in `mentors` (its trainable
    entries). Results: test_accuracy is the mean over clients of each client's mentor on its own test split (the
    paper's metric); mentee_accuracy the shared mentee's, evaluated the same way."""
    transient = Algorithm.transient + ("mentor",)

    def __init__(self, mentor: dict | None = None, adaptive: bool = True, hidden: bool = True, svd: bool = True,
                 t_start: float = 0.95, t_end: float = 0.98, server_lr: float = 1.0):
        super().__init__(server_lr=server_lr)
        if mentor is None:
            raise SuiteError("fedkd needs a mentor model spec (method.mentor: {name: ..., ...})")
        if not 0 < t_start <= t_end <= 1:
            raise SuiteError(f"fedkd needs 0 < t_start <= t_end <= 1, got {t_start}, {t_end}")
        self.mentor_spec, self.adaptive, self.hidden, self.svd = dict(mentor), adaptive, hidden, svd
        self.t_start, self.t_end = t_start, t_end

    def setup(self, ctx):
        super().setup(ctx)
        spec, data = dict(self.mentor_spec), ctx.data
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sub_seed(ctx.spec["seed"], 0x3E7))  # the mentor's head initialisation
            self.mentor = build_model(spec.pop("name"), in_channels=data.input_shape[0], num_classes=data.num_classes,
                                      input_size=data.input_shape[-1], data_root=ctx.data_root, **spec).to(ctx.device)
        self.text = is_text_encoder(ctx.model) and is_text_encoder(self.mentor)
        if self.hidden and not self.text:
            raise SuiteError("fedkd: hidden-state and attention distillation (hidden: true) needs text encoders as "
                             "mentor and mentee; set hidden: false for other models")
        if self.hidden:  # attention probabilities are returned by the eager implementation only
            for m in (self.mentor, ctx.model):
                m.features.encoder.set_attn_implementation("eager")
        self.shared = trainable_keys(ctx.model)  # the mentee's entries that train and travel
        self.mentor_keys = trainable_keys(self.mentor)
        initial = self.mentor.state_dict()
        self.mentor_init = {k: initial[k].detach().clone() for k in self.mentor_keys}
        self.mentors: dict[int, State] = {}  # client -> its mentor's trainable entries
        self.pairs = aligned_blocks(depth(self.mentor), depth(ctx.model)) if self.hidden else []
        self.uploaded: dict[int, int] = {}
        self.broadcast: int | None = None  # bytes of the last aggregated update (None: nothing broadcast yet)
        self.ranks: list[dict] = []  # per round, per matrix: the rank the server kept (-1: sent dense)
        self.round = 0

    def energy(self, round_index: int) -> float | None:
        if not self.svd:
            return None
        return energy_threshold(round_index, self.ctx.spec["training"]["rounds"], self.t_start, self.t_end)

    def load_mentor(self, client: int) -> None:
        self.mentor.load_state_dict(self.mentors.get(client, self.mentor_init), strict=False)

    # --- client side -------------------------------------------------------------------------------------------
    def train_client(self, run, client, round_index):
        mentee, mentor = self.ctx.model, self.mentor
        self.load_mentor(client)
        gen = torch.Generator().manual_seed(sub_seed(run.seed, round_index, client))
        lr = run.lr if run.lr_decay == 1.0 else run.lr * run.lr_decay ** round_index
        self.ctx.round_lr = lr
        params = [p for m in (mentor, mentee) for p in m.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=run.weight_decay) if run.optimizer in ("adam", "adamw") \
            else torch.optim.SGD(params, lr=lr, momentum=run.momentum, weight_decay=run.weight_decay)
        self.round = round_index
        mentor.train()
        mentee.train()
        internals = self.hidden

        def losses():
            for x, y in run.client_batches(client, run.epochs, gen):
                zt, ht, at = encoder_outputs(mentor, x, internals)
                zs, hs, as_ = encoder_outputs(mentee, x, internals)
                yield mutual_distillation_loss(zt, zs, y, [ht[i] for i, _ in self.pairs], [hs[j] for _, j in self.pairs],
                                               [at[i] for i, _ in self.pairs], [as_[j] for _, j in self.pairs],
                                               adaptive=self.adaptive)
        result = minimise(losses(), opt)
        state = mentor.state_dict()
        self.mentors[client] = {k: state[k].detach().clone() for k in self.mentor_keys}
        return result

    @torch.no_grad()
    def end_client(self, model, global_state, client, steps):
        """The mentee's update, compressed as sent; the client's state becomes what the server reconstructs."""
        params = dict(model.named_parameters())
        update = {k: params[k].detach() - global_state[k] for k in self.shared}
        sent, nbytes, _ = compress_update(update, self.energy(self.round))
        for k in self.shared:
            params[k].copy_(global_state[k] + sent[k])
        self.uploaded[client] = nbytes

    def transmitted_keys(self, state):
        return list(self.shared)

    def upload_bytes(self, client_state, client, round_index):
        return self.uploaded[client]

    def download_bytes(self, global_state, client, round_index):
        """The initial mentee's shared entries in the first round, then the last aggregated update as sent."""
        if self.broadcast is None:
            return dense_bytes(global_state[k] for k in self.shared)
        return self.broadcast

    # --- server side -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def server_update(self, global_state, client_states, weights, round_index):
        w = torch.tensor(weights, dtype=torch.float64)
        w = (w / w.sum()).tolist()
        mean = {k: sum(wi * (s[k].double() - global_state[k].double()) for s, wi in zip(client_states, w))
                .to(global_state[k].dtype) for k in self.shared}
        energy = self.energy(round_index)
        sent, self.broadcast, ranks = compress_update(mean, energy)
        self.ranks.append(ranks)
        new = dict(global_state)
        for k in self.shared:
            new[k] = global_state[k] + sent[k]
        return new

    # --- evaluation ----------------------------------------------------------------------------------------------
    def evaluate(self, run, global_state):
        model = self.ctx.model
        model.load_state_dict(global_state)
        mentee = evaluate_clients(run, lambda k: model)

        def mentor_of(client):
            self.load_mentor(client)
            return self.mentor
        out = evaluate_clients(run, mentor_of)
        out["mentee_accuracy"] = mentee["test_accuracy"]
        out["energy"] = self.energy(self.round)
        out["server_rank"] = self.ranks[-1] if self.ranks else {}
        return out


@register_algorithm("fedavg_trainable")
class FedAvgTrainable(Algorithm):
    """FedAvg of a partly frozen model: only the entries that train travel (the frozen ones are known to every
    party and never change) and only they are averaged."""

    def setup(self, ctx):
        super().setup(ctx)
        self.shared = trainable_keys(ctx.model)

    def transmitted_keys(self, state):
        return list(self.shared)

    def server_update(self, global_state, client_states, weights, round_index):
        new = super().server_update(global_state, client_states, weights, round_index)
        return {k: new[k] if k in self.shared else global_state[k] for k in global_state}
