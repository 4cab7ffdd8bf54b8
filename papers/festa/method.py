"""FeSTA: federated split task-agnostic learning with a Vision Transformer (Park et al., NeurIPS 2021).

Every client k has its own CNN head H_k and a tail T_k for its task (classification, detection or segmentation); the
server holds one transformer body B shared by every client and task (`common/models/vit_split.py`). A round is
`local_epochs` passes of each client over its data in minibatches, taken in synchronous steps. In one step, each
client with a batch left:

1. computes its head features h_k = H_k(x_k) and sends them (upload: h_k);
2. the server computes b_k = B(h_k) and sends it back (download: b_k);
3. the client computes its task loss L_k = loss(T_k(b_k), y_k), updates its tail with dL_k/dT_k and sends the
   gradient g_k = dL_k/db_k (upload: g_k);
4. the server back-propagates g_k through the body, giving dL_k/dB and dL_k/dh_k, and sends dL_k/dh_k (download),
   with which the client updates its head.

The body takes one step with the gradient averaged over tasks and, within a task, over its clients of that step:
sum over tasks t of 1/|tasks| * mean over clients k of t of dL_k/dB (the gradient of that weighted mean of the
clients' losses; with equal clients per task, the plain mean over clients). Every round whose number is a multiple of
`unify_every` (a "unifying round") ends with each task's heads and tails averaged over that task's clients
(sample-weighted, FedAvg), never across tasks: each client uploads its head and tail and downloads its task's average
at the start of the next round. The body's weights never travel.

Single-task split learning is the same method with `tasks` one task (only that task's clients take part; its
body sees only that task). The centralised ceiling is `pooled: true`: one client per task holding the pooled
training data of all that task's clients (split training of one client is ordinary training of the composed
network, head -> body -> tail, on the pooled data). With `all_targets: true` (the ceiling) every task's client holds
the images of every taking-part client pooled, each with that task's target where the image has one: on data whose
images carry every task's target (cxr3) each task trains on all of them, an upper reference (a federated client
labels only its own task); on data with one task per image it is the per-task pooling above.

Bytes (common/fl/communication.py) are counted from the tensors each step sends (float32 features, body outputs and
both gradients), plus the head and tail states on unifying rounds. `fl_model_bytes` logs, for comparison, what one
client of a FedAvg-style exchange of the same network (head + body + tail, one way) would send per round.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import box_convert, box_iou, generalized_box_iou_loss

from common.errors import SuiteError
from common.fl.algorithms import Algorithm, register_algorithm
from common.fl.communication import dense_bytes
from common.fl.engine import clone_state, sub_seed
from common.segmentation import THRESHOLD, dice, segmentation_loss

TASKS = ("classification", "detection", "segmentation")


# ---- task losses and metrics ----------------------------------------------------------------------------------------

def task_loss(task: str, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (classification); L1 + generalised IoU loss of the box (detection: `out` is (cx, cy, w, h),
    the target (x0, y0, x1, y1), fractions of the image); soft Dice of the mask (segmentation)."""
    if task == "classification":
        return F.cross_entropy(out, target)
    if task == "detection":
        box = box_convert(out, "cxcywh", "xyxy")
        return F.l1_loss(box, target) + generalized_box_iou_loss(box, target, reduction="mean")
    return segmentation_loss(out, target)


@torch.no_grad()
def task_scores(task: str, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image score in [0, 1]: correct class; IoU of the predicted and true box; Dice of the thresholded mask."""
    if task == "classification":
        return (out.argmax(1) == target).double()
    if task == "detection":
        return box_iou(box_convert(out, "cxcywh", "xyxy"), target).diagonal().double()
    pred = (torch.sigmoid(out) > THRESHOLD)[:, 0].cpu().numpy()
    return torch.from_numpy(dice(pred, target[:, 0].cpu().numpy() > 0.5)).double()


# ---- one synchronous split-learning step --------------------------------------------------------------------------

def split_step(model, batches: dict[int, tuple[torch.Tensor, torch.Tensor]], body_weights: dict[int, float]) -> dict:
    """One step of split learning of `model` (a SplitViT) on each client's batch {client: (x, target)}: leaves in
    every head's and tail's .grad the gradient of its client's own loss and in the body's .grad the weighted sum
    sum_k body_weights[k] * dL_k/dB, computed the way the messages travel (the client side never sees the body, the
    server side never sees a tail or a label). Returns {client: {"loss", "up", "down"}} with the bytes sent."""
    body_params = [p for p in model.body.parameters()]
    body_grad = [torch.zeros_like(p) for p in body_params]
    out = {}
    for k, (x, y) in batches.items():
        task = model.task_of(k)
        h = model.heads[k](x)                                   # client: head features
        sent_h = h.detach().requires_grad_(True)                # -> server
        b = model.body(sent_h)                                  # server: body
        sent_b = b.detach().requires_grad_(True)                # -> client
        loss = task_loss(task, model.tails[k](sent_b), y)       # client: tail and loss
        tail_params = list(model.tails[k].parameters())
        grads = torch.autograd.grad(loss, tail_params + [sent_b])
        for p, g in zip(tail_params, grads[:-1]):
            p.grad = g if p.grad is None else p.grad + g
        g_b = grads[-1]                                         # -> server: dL/db
        server = torch.autograd.grad(b, [sent_h] + body_params, g_b)
        g_h = server[0]                                         # -> client: dL/dh
        for acc, g in zip(body_grad, server[1:]):
            acc.add_(g, alpha=body_weights[k])
        h.backward(g_h)                                         # client: head
        out[k] = {"loss": loss.item(), "up": dense_bytes([sent_h, g_b]), "down": dense_bytes([sent_b, g_h])}
    for p, g in zip(body_params, body_grad):
        p.grad = g
    return out


def body_weights(model, clients: list[int]) -> dict[int, float]:
    """Each client's weight in the body's gradient: 1/|tasks present| * 1/|that task's clients present|."""
    by_task: dict[str, list[int]] = {}
    for k in clients:
        by_task.setdefault(model.task_of(k), []).append(k)
    return {k: 1.0 / (len(by_task) * len(ks)) for ks in by_task.values() for k in ks}


def unify(state: dict, groups: list[list[int]], sizes: dict[int, int]) -> dict:
    """Heads and tails averaged within each group of clients (one task's clients), sample-weighted; the body and
    every client outside the groups unchanged. Entries are `heads.<k>.*` and `tails.<k>.*`."""
    new = dict(state)
    for group in groups:
        if len(group) < 2:
            continue
        w = torch.tensor([sizes[k] for k in group], dtype=torch.float64)
        w = w / w.sum()
        for part in ("heads", "tails"):
            prefix = f"{part}.{group[0]}."
            for key in [k for k in state if k.startswith(prefix)]:
                name = key[len(prefix):]
                avg = sum(wi * state[f"{part}.{k}.{name}"].double() for wi, k in zip(w.tolist(), group))
                for k in group:
                    new[f"{part}.{k}.{name}"] = avg.to(state[key].dtype).clone()
    return new


def client_state_bytes(state: dict, client: int) -> int:
    """Bytes of client k's head and tail (what it uploads and downloads on a unifying round)."""
    return dense_bytes(v for key, v in state.items() if key.startswith((f"heads.{client}.", f"tails.{client}.")))


@register_algorithm("festa")
class FeSTA(Algorithm):
    """FeSTA's split training; `tasks` the tasks whose clients take part, `pooled` the centralised ceiling."""
    transient = Algorithm.transient + ("model", "index", "active", "groups", "targets", "round_out", "trained",
                                       "unified_last")

    def __init__(self, tasks: list[str] = TASKS, unify_every: int = 5, pooled: bool = False,
                 samples_per_client: dict | None = None, all_targets: bool = False):
        super().__init__()
        unknown = set(tasks) - set(TASKS)
        if unknown or not tasks:
            raise SuiteError(f"festa: tasks must be among {', '.join(TASKS)}, got {tasks}")
        if unify_every < 1:
            raise SuiteError(f"festa: unify_every must be at least 1, got {unify_every}")
        if all_targets and not pooled:
            raise SuiteError("festa: all_targets (every pooled image with every task's target) needs pooled: true")
        self.tasks, self.unify_every, self.pooled, self.all_targets = tuple(tasks), unify_every, pooled, all_targets
        self.samples_per_client = dict(samples_per_client or {})

    # --- set-up ------------------------------------------------------------------------------------------------
    def setup(self, ctx):
        self.ctx, self.model = ctx, ctx.model
        self.param_names = [n for n, _ in ctx.model.named_parameters()]
        if not hasattr(ctx.model, "task_of"):
            raise SuiteError("festa trains a split network: its model must be split_vit")
        if "targets" not in ctx.data.extra:
            raise SuiteError(f"festa needs a multi-task dataset (class, box, mask per image, e.g. cxr3); "
                             f"'{ctx.data.name}' has none")
        if ctx.model.clients != len(ctx.parts):
            raise SuiteError(f"festa: the model has {ctx.model.clients} client heads, the partition "
                             f"{len(ctx.parts)} clients (set model.clients to partition.clients)")
        has = ctx.data.extra["has"]["train"]
        per_task: dict[str, list[int]] = {t: [] for t in self.tasks}
        index: dict[int, torch.Tensor] = {}
        for k, part in enumerate(ctx.parts):
            task = ctx.model.task_of(k)
            if task not in self.tasks:
                continue
            idx = part[has[task][part]]
            limit = self.samples_per_client.get(task)
            index[k] = idx[:limit] if limit else idx
            per_task[task].append(k)
        if any(not ks for ks in per_task.values()):
            raise SuiteError(f"festa: no client has the task(s) "
                             f"{', '.join(t for t, ks in per_task.items() if not ks)}")
        if self.pooled and self.all_targets:
            # one client per task (its first) with every taking-part client's images pooled, each image with that
            # task's target where it has one: the task sees the other tasks' clients' images too
            every = torch.cat([index[k] for k in sorted(index)])
            index = {ks[0]: every[has[t][every]] for t, ks in per_task.items()}
            per_task = {t: ks[:1] for t, ks in per_task.items()}
        elif self.pooled:  # one client per task (its first) with the pooled data of the task's clients
            index = {ks[0]: torch.cat([index[k] for k in ks]) for ks in per_task.values()}
            per_task = {t: ks[:1] for t, ks in per_task.items()}
        self.index = {k: v.to(ctx.device) for k, v in index.items()}
        self.active = sorted(index)
        self.groups = [ks for ks in per_task.values()]
        self.targets = {t: v.to(ctx.device) for t, v in ctx.data.extra["targets"]["train"].items()}
        params = [p for n, p in ctx.model.named_parameters()]
        opt = ctx.spec["training"].get("optimizer", "adam")
        lr = ctx.spec["training"]["lr"]
        if opt == "sgd":
            self.opt = torch.optim.SGD(params, lr=lr, momentum=ctx.spec["training"].get("momentum", 0.0))
        elif opt == "adam":
            # one Adam over every parameter: per-parameter state, so the same as one per client and one for the body
            self.opt = torch.optim.Adam(params, lr=lr)
        else:
            raise SuiteError(f"festa: training.optimizer must be adam or sgd, got {opt}")
        self.round_out, self.trained, self.unified_last = {}, None, False

    def is_unifying(self, round_index: int) -> bool:
        return not self.pooled and (round_index + 1) % self.unify_every == 0

    # --- the round -----------------------------------------------------------------------------------------------
    def clients_of_round(self, run, round_index):
        return list(self.active)

    def batches(self, run, client: int, round_index: int):
        gen = torch.Generator().manual_seed(sub_seed(run.seed, round_index, client))
        idx = self.index[client]
        task = self.model.task_of(client)
        for _ in range(run.epochs):
            perm = torch.randperm(len(idx), generator=gen).to(idx.device)
            for i in range(0, len(idx), run.batch_size):
                b = idx[perm[i:i + run.batch_size]]
                yield run.x[b], self.targets[task][b]

    def begin_round(self, run, round_index, clients, global_state):
        model = self.model
        model.load_state_dict(global_state)
        model.train()
        self.unified_last = round_index > 0 and self.is_unifying(round_index - 1)
        iters = {k: self.batches(run, k, round_index) for k in clients}
        stats = {k: {"loss": 0.0, "steps": 0, "up": 0, "down": 0} for k in clients}
        while iters:
            batches = {}
            for k in list(iters):
                b = next(iters[k], None)
                if b is None:
                    del iters[k]
                else:
                    batches[k] = b
            if not batches:
                break
            self.opt.zero_grad(set_to_none=True)
            out = split_step(model, batches, body_weights(model, list(batches)))
            self.opt.step()
            for k, o in out.items():
                s = stats[k]
                s["loss"] += o["loss"]
                s["steps"] += 1
                s["up"] += o["up"]
                s["down"] += o["down"]
        self.round_out = stats
        self.trained = clone_state(model)
        h = run.ctx.history
        if h is not None:
            body = dense_bytes(model.body.state_dict().values())
            h.log("split_up", float(np.mean([s["up"] for s in stats.values()])))
            h.log("split_down", float(np.mean([s["down"] for s in stats.values()])))
            h.log("fl_model_bytes", float(np.mean([body + client_state_bytes(self.trained, k) for k in clients])))

    def train_client(self, run, client, round_index):
        self.model.load_state_dict(self.trained)
        s = self.round_out[client]
        loss = s["loss"] / max(s["steps"], 1)
        return (loss if math.isfinite(loss) else math.nan), s["steps"]

    def download_bytes(self, global_state, client, round_index):
        """The body outputs and feature gradients of the round's steps, and after a unifying round the task's
        averaged head and tail."""
        extra = client_state_bytes(global_state, client) if self.unified_last else 0
        return self.round_out[client]["down"] + extra

    def upload_bytes(self, client_state, client, round_index):
        """The head features and body-output gradients of the round's steps, and on a unifying round the head and
        tail."""
        extra = client_state_bytes(client_state, client) if self.is_unifying(round_index) else 0
        return self.round_out[client]["up"] + extra

    def server_update(self, global_state, client_states, weights, round_index):
        state = client_states[0]  # every client's copy holds the whole split network after the round
        if self.is_unifying(round_index):
            state = unify(state, self.groups, {k: len(v) for k, v in self.index.items()})
        return state

    # --- evaluation ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, run, global_state):
        """Per task, the score of the network of the task's first client (its head, the body, its tail) on the test
        images with that task's target: accuracy, box IoU, Dice (after a unifying round, such as the last, every
        client of a task has the same head and tail). test_accuracy is the mean over the tasks trained;
        `domain_accuracy` maps each task to its score."""
        model = self.model
        model.load_state_dict(global_state)
        model.eval()
        data = run.ctx.data
        scores, losses = {}, {}
        for task, group in zip(self.tasks, self.groups):
            has = data.extra["has"]["test"][task].to(run.x_test.device)
            x = run.x_test[has]
            y = data.extra["targets"]["test"][task].to(run.x_test.device)[has]
            per_client, per_loss = [], []
            for k in group[:1]:
                out = torch.cat([model(x[i:i + 256], k) for i in range(0, len(x), 256)])
                per_client.append(float(task_scores(task, out, y).mean()))
                per_loss.append(float(task_loss(task, out, y)))
            scores[task], losses[task] = float(np.mean(per_client)), float(np.mean(per_loss))
        model.train()
        return {"test_accuracy": float(np.mean(list(scores.values()))),
                "test_loss": float(np.mean(list(losses.values()))), "domain_accuracy": scores}
