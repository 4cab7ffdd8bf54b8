"""FedPav and its optimisations (Zhuang et al., ACM MM 2020), on the engine's `LocalEntries` (common/fl/personal.py).

- **Identity classifiers are local.** Each client's classifier covers only its own identities: the model's head spans
  the union of all identities, and a client's loss is the cross-entropy of the softmax over its own identities' logits
  (`ClientIdentities`), which is a classifier of its own size, as the authors' per-client `ClassBlock`. FedPav
  averages everything but the head (the backbone: the model's `features`), weighted by the clients' data sizes; the
  head is never sent nor averaged. Evaluation uses the backbone's features only (retrieval, common/retrieval.py).
- **Knowledge distillation** (`kd`): after aggregation, the server distils the clients' ensemble onto the averaged
  backbone on the shared public set: the target of an image is the mean over the round's clients of their trained
  backbones' features, each L2-normalised first (`regularization`, the authors' `--regularization`); the server
  model's features regress it (MSE) for one pass over the public set, SGD with lr = 0.01 x the clients' lr, momentum
  0.9 (Nesterov), weight decay 5e-4 (the authors' server.knowledge_distillation). The authors distil every 10th
  round (when they test); `kd_every` sets it.
- **Cosine distance weighting** (`cdw`): each client measures how much local training changed its model: on a batch
  of data, 1 - cos(o_before, o_after) averaged over the batch, where o_before is the output of the received global
  backbone with the client's classifier before training and o_after that of the trained model (the classifier's
  outputs over the client's identities, as the authors' optimization.cdw_feature_distance). The server weights the
  clients' backbones by these distances (normalised) instead of their data sizes. The batch is drawn from the
  client's own training data (`cdw_data: local`, the authors' code: the first batch of its shuffled loader) or from
  the shared public set (`cdw_data: public`).
- **Local training** (`reid_local`): every client trains alone, its own model, softmax over its own identities.
The FedAvg baseline with one shared classifier over the union of identities is the engine's `fedavg`.
- **Ceiling** (`reid_centralised`): the same model trained centrally on the pooled data of every dataset, each image's
  loss the softmax over its own dataset's identities (per-dataset classifiers over a shared backbone).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from common.distill import ensemble_features
from common.errors import SuiteError
from common.fl.algorithms import Algorithm, Centralised, register_algorithm
from common.fl.engine import clone_state, sub_seed
from common.fl.personal import LocalEntries, SingleSet, last_layers_keys


def client_identity_mask(labels: torch.Tensor, parts: list[torch.Tensor], num_classes: int) -> torch.Tensor:
    """(clients, classes) additive logit mask: 0 for the identities in a client's training data, -inf elsewhere."""
    mask = torch.full((len(parts), num_classes), -math.inf)
    for k, idx in enumerate(parts):
        mask[k, torch.unique(labels[idx])] = 0.0
    return mask


def cosine_distance(before: torch.Tensor, after: torch.Tensor) -> float:
    """Mean over rows of 1 - cos(before_i, after_i): how far local training moved a client's outputs."""
    return float((1 - F.cosine_similarity(before, after, dim=1)).mean())


class ClientIdentities:
    """A client's loss over its own identities only: a local classifier of its own size."""
    transient = (*Algorithm.transient, "id_mask")

    def _setup_identities(self, ctx):
        self.id_mask = client_identity_mask(ctx.data.train.y.cpu(), [p.cpu() for p in ctx.parts],
                                            ctx.data.num_classes).to(ctx.device)
        self.current_client = None

    def begin_client(self, model, global_state, client):
        self.current_client = client
        super().begin_client(model, global_state, client)

    def local_loss(self, model, x, y):
        return F.cross_entropy(model(x) + self.id_mask[self.current_client], y)


@register_algorithm("reid_local")
class LocalReID(ClientIdentities, SingleSet):
    """Local training only: each client its own model, trained on its own identities, never communicated."""

    def setup(self, ctx):
        super().setup(ctx)
        self._setup_identities(ctx)


@register_algorithm("fedpav")
class FedPav(ClientIdentities, LocalEntries):
    transient = (*ClientIdentities.transient, "scratch", "x_public", "_head_keys")

    def __init__(self, kd: bool = False, kd_every: int = 1, kd_lr: float | None = None, regularization: bool = True,
                 cdw: bool = False, cdw_data: str = "local", server_lr: float = 1.0):
        super().__init__(server_lr=server_lr)
        if kd_every < 1:
            raise SuiteError(f"fedpav: kd_every must be >= 1, got {kd_every}")
        if cdw_data not in ("local", "public"):
            raise SuiteError(f"fedpav: cdw_data must be 'local' or 'public', got {cdw_data!r}")
        self.kd, self.kd_every, self.kd_lr, self.regularization = kd, kd_every, kd_lr, regularization
        self.cdw, self.cdw_data = cdw, cdw_data
        self.cdw_distance: dict[int, float] = {}
        self.round_clients: list[int] = []
        self.round_index = 0

    def setup(self, ctx):
        self._head_keys = last_layers_keys(ctx.model, 1)
        super().setup(ctx)
        self._setup_identities(ctx)
        if (self.kd or (self.cdw and self.cdw_data == "public")) and "public_x" not in ctx.data.extra:
            raise SuiteError(f"fedpav: knowledge distillation and cdw_data 'public' need a shared public set "
                             f"(dataset {ctx.data.name} has none)")
        self.x_public = ctx.data.extra.get("public_x")
        if self.x_public is not None:
            self.x_public = self.x_public.to(ctx.device)
        self.scratch = ctx.make_model()

    def is_local(self, model, key):
        return key in self._head_keys

    def clients_of_round(self, run, round_index):
        self.round_clients = super().clients_of_round(run, round_index)
        self.round_index = round_index
        return self.round_clients

    # --- cosine distance weight --------------------------------------------------------------------------------
    def cdw_batch(self, client: int) -> torch.Tensor:
        ctx = self.ctx
        gen = torch.Generator().manual_seed(sub_seed(ctx.spec["seed"], self.round_index, client, 0xCD))
        bs = ctx.spec["training"]["batch_size"]
        if self.cdw_data == "public":
            return self.x_public[torch.randperm(len(self.x_public), generator=gen)[:bs].to(ctx.device)]
        idx = ctx.parts[client][torch.randperm(len(ctx.parts[client]), generator=gen)[:bs]]
        return ctx.data.train.x[idx].to(ctx.device)

    def begin_client(self, model, global_state, client):
        super().begin_client(model, global_state, client)
        if self.cdw:  # the received backbone with the client's classifier before local training
            self.before = clone_state(model)

    @torch.no_grad()
    def client_outputs(self, model, x, client) -> torch.Tensor:
        model.eval()
        out = model(x)[:, self.id_mask[client] == 0]
        model.train()
        return out

    def end_client(self, model, global_state, client, steps):
        if self.cdw:
            x = self.cdw_batch(client)
            self.scratch.load_state_dict(self.before)
            self.cdw_distance[client] = cosine_distance(self.client_outputs(self.scratch, x, client),
                                                        self.client_outputs(model, x, client))
            self.before = None
        super().end_client(model, global_state, client, steps)

    # --- server ------------------------------------------------------------------------------------------------
    def server_update(self, global_state, client_states, weights, round_index):
        if self.cdw:
            weights = [self.cdw_distance[k] for k in self.round_clients]
            total = sum(weights)
            self.ctx.history.log("cdw_weights", [w / total for w in weights])
        new = super().server_update(global_state, client_states, weights, round_index)
        if self.kd and (round_index + 1) % self.kd_every == 0:
            new = self.distil(new, client_states, round_index)
        elif self.kd:
            self.ctx.history.log("kd_loss", None)  # one entry per round
        return new

    def distil(self, state, client_states, round_index):
        """One pass of the server model's features over the public set towards the clients' mean feature."""
        feats = []
        for s in client_states:
            self.scratch.load_state_dict(s)
            self.scratch.eval()
            with torch.no_grad():
                feats.append(torch.cat([self.scratch.features(self.x_public[i:i + 500])
                                        for i in range(0, len(self.x_public), 500)]))
        target = ensemble_features(feats, normalise=self.regularization)
        student = self.ctx.model
        student.load_state_dict(state)
        student.train()
        t = self.ctx.spec["training"]
        lr = self.kd_lr if self.kd_lr is not None else 0.01 * t["lr"]
        opt = torch.optim.SGD(student.features.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
        gen = torch.Generator().manual_seed(sub_seed(self.ctx.spec["seed"], round_index, 0x3D))
        perm = torch.randperm(len(self.x_public), generator=gen).to(self.ctx.device)
        total, n = 0.0, 0
        for i in range(0, len(perm), t["batch_size"]):
            b = perm[i:i + t["batch_size"]]
            loss = F.mse_loss(student.features(self.x_public[b]), target[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
            n += 1
        self.ctx.history.log("kd_loss", total / max(n, 1))
        return clone_state(student)


@register_algorithm("reid_centralised")
class CentralisedReID(Centralised):
    """The ceiling of the FedReID tables: the same model trained on the pooled data of every dataset, each image's
    loss the softmax over its own dataset's identities (one classifier per dataset over a shared backbone, as FedPav
    and local training have), instead of one classifier over the union of identities."""
    transient = (*Centralised.transient, "same_dataset")

    def setup(self, ctx):
        super().setup(ctx)
        y, dom = ctx.data.train.y.cpu(), ctx.data.train.domain.cpu()
        of_class = torch.full((ctx.data.num_classes,), -1, dtype=torch.long)
        of_class[y] = dom
        # (classes, classes) additive mask: row c keeps the identities of class c's dataset
        self.same_dataset = torch.where(of_class[:, None] == of_class[None, :], 0.0, -math.inf).to(ctx.device)

    def local_loss(self, model, x, y):
        return F.cross_entropy(model(x) + self.same_dataset[y], y)
