"""The federated training loop shared by every algorithm.

Clients are index sets into one in-memory training tensor, so no per-client datasets, loaders or model copies
exist: one model object is loaded with the global state, trained on the client's slice, and its state kept.
Every random choice (initialisation, client sampling, batch order) is derived from the run's seed and the
(round, client) it belongs to, so a run is bit-for-bit repeatable on the CPU.
"""
from __future__ import annotations

import itertools
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common.data import Dataset
from common.errors import SuiteError
from common.fl.algorithms import Algorithm, State
from common.segmentation import evaluate_segmentation, is_mask_target


@dataclass
class RunContext:
    """What an algorithm may use: the run's spec, data, model factory and device."""
    spec: dict
    data: Dataset
    parts: list[torch.Tensor]
    model: torch.nn.Module
    make_model: callable
    device: torch.device
    data_root: str
    history: "History | None" = None
    round_lr: float | None = None  # the client learning rate of the round being trained, set by local_train
    # the clients that per-client evaluation serves, when they are not the clients that train: the centralised
    # ceiling pools the partition's clients into one (`parts`) and keeps them here (None: `parts`)
    eval_parts: list[torch.Tensor] | None = None


@dataclass
class History:
    rounds: list[int] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    extra: dict[str, list] = field(default_factory=dict)
    status: str = "completed"
    resumed_at: list[int] = field(default_factory=list)  # rounds at which a crashed run was continued

    def log(self, key: str, value) -> None:
        self.extra.setdefault(key, []).append(value)


def sub_seed(*keys: int) -> int:
    """A 63-bit seed derived from integer keys (seed, round, client, ...), independent of call order."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> np.uint64(1))


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000,
             classes: torch.Tensor | None = None) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of `model` in eval mode; for segmentation masks (N, S, H, W) (mean Dice over
    structures, Dice loss), see common/segmentation.py. With `classes` (label ids) the prediction is restricted to
    them: the logits of every other class are -inf, so the argmax is over `classes` and the cross-entropy that of the
    softmax over them (every label in `y` must be one of `classes`)."""
    if is_mask_target(y):
        m = evaluate_segmentation(model, x, y, tuple(range(y.shape[1])))
        return float(np.mean(list(m["dice"].values()))), m["loss"]
    model.eval()
    correct, loss = 0, 0.0
    mask = None
    for i in range(0, len(y), batch_size):
        out = model(x[i:i + batch_size])
        if classes is not None:
            if mask is None:
                mask = torch.full((out.shape[1],), -math.inf, dtype=out.dtype, device=out.device)
                mask[classes.to(out.device)] = 0.0
            out = out + mask
        loss += F.cross_entropy(out, y[i:i + batch_size], reduction="sum").item()
        correct += (out.argmax(1) == y[i:i + batch_size]).sum().item()
    return correct / len(y), loss / len(y)


def evaluate_clients(run: "FederatedRun", model_for_client) -> dict:
    """Per-client evaluation, the one mechanism behind personalised accuracy and FedBN's per-domain accuracy:
    `model_for_client(k)` is the model that serves client k (the global model, or the client's own), evaluated on
    client k's own test split (`FederatedRun.client_tests`: drawn from the test set with the client's training
    label proportions, or on multi-domain data the test split of the client's domain; a domain held by no single
    client is served by `model_for_client(None)`, which only the global model can). With `evaluation.adapt_steps`
    the model first takes that many SGD steps (lr `evaluation.adapt_lr`) on batches of the client's training data
    (Per-FedAvg's evaluation after one local step). With `evaluation.restrict_to_client_labels` each split's
    predictions are restricted to the classes in its client's training data (an oracle that knows each client's
    label set: the centralised ceiling of a personalised table). test_accuracy and test_loss are the mean over clients
    (`evaluation.weighting: clients`, the default: each client counts once; FedBN's mean over domains) or pooled over
    every client's test samples (`samples`: pFedHN's code); client_accuracy lists each client's accuracy, and on
    multi-domain data domain_accuracy and domain_loss map each client's domain name to its values. On segmentation
    data (masks with named `structures`) a split's accuracy is its mean Dice over structures and its loss the Dice
    loss (`common/segmentation.py`), and domain_dice, domain_hd95 and domain_hd95_undefined map each domain to its
    per-structure values (a held-out site of a leave-one-site-out run is evaluated like the others). On a retrieval
    dataset (person re-identification, `extra["retrieval"]`) each domain's queries are ranked against its gallery
    instead (`common.retrieval.evaluate_retrieval`: rank-1 and mAP per domain)."""
    if run.ctx.data.extra.get("retrieval"):  # person re-identification: rank-1 and mAP per domain
        from common.retrieval import evaluate_retrieval
        return evaluate_retrieval(run, model_for_client)
    structures = tuple(run.ctx.data.extra.get("structures", ()))
    accs, losses, sizes, per_structure = [], [], [], []
    for k, idx in enumerate(run.client_tests):
        if len(idx) == 0:
            accs.append(None)
            losses.append(None)
            sizes.append(0)
            per_structure.append(None)
            continue
        client = run.unit_client[k]
        model = model_for_client(client)
        if run.adapt_steps:
            if client is None:
                raise SuiteError("evaluation.adapt_steps needs a client per test split")
            model = run.adapt(model, client)
        if structures:
            m = evaluate_segmentation(model, run.x_test[idx], run.y_test[idx], structures)
            a, l = float(np.mean(list(m["dice"].values()))), m["loss"]
            per_structure.append(m)
        else:
            a, l = evaluate(model, run.x_test[idx], run.y_test[idx],
                            classes=run.client_labels(client, idx) if run.restrict_labels else None)
        accs.append(a)
        losses.append(l)
        sizes.append(len(idx))
    kept = [i for i, n in enumerate(sizes) if n]
    if run.eval_weighting == "samples":
        w = np.array([sizes[i] for i in kept], dtype=np.float64) / sum(sizes)
        acc = float(np.sum(w * np.array([accs[i] for i in kept])))
        loss = float(np.sum(w * np.array([losses[i] for i in kept])))
    else:
        acc, loss = float(np.mean([accs[i] for i in kept])), float(np.mean([losses[i] for i in kept]))
    out = {"test_accuracy": acc, "test_loss": loss}
    if run.test_domain is not None:
        names = run.ctx.data.domains
        out["domain_accuracy"] = dict(zip(names, accs))
        out["domain_loss"] = dict(zip(names, losses))
        if structures:
            for field in ("dice", "hd95", "hd95_undefined"):
                out[f"domain_{field}"] = {n: m[field] for n, m in zip(names, per_structure) if m is not None}
    else:
        out["client_accuracy"] = accs
    return out



def minimise(losses, opt: torch.optim.Optimizer, max_grad_norm: float | None = None) -> tuple[float, int]:
    """One optimiser step on each loss of the iterable `losses` (computed lazily, one after another); returns
    (mean loss, steps), or (the nan/inf sum, steps) as soon as the loss diverges. With `max_grad_norm` the gradient
    is clipped to that total norm before each step (torch.nn.utils.clip_grad_norm_)."""
    total, steps = 0.0, 0
    params = [p for g in opt.param_groups for p in g["params"]] if max_grad_norm else []
    for loss in losses:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        total += loss.item()
        steps += 1
        if not math.isfinite(total):
            return total, steps
    return total / max(steps, 1), steps


def clone_state(model: torch.nn.Module) -> State:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class FederatedRun:
    """One federated training run: `FederatedRun(ctx, algorithm).train()` returns its `History`."""

    def __init__(self, ctx: RunContext, algorithm: Algorithm):
        self.ctx, self.algo = ctx, algorithm
        t = ctx.spec["training"]
        self.rounds, self.fraction = t["rounds"], t["client_fraction"]
        self.epochs, self.batch_size, self.lr = t["local_epochs"], t["batch_size"], t["lr"]
        self.momentum, self.weight_decay = t.get("momentum", 0.0), t.get("weight_decay", 0.0)
        self.local_steps = t.get("local_steps")  # None: local_epochs passes over the client's data
        self.max_grad_norm = t.get("max_grad_norm")  # None: local gradients are not clipped
        self.lr_decay = t.get("lr_decay", 1.0)  # client lr of round r: lr * lr_decay**r (1: constant)
        self.optimizer = t.get("optimizer", "sgd")
        self.amsgrad = bool(t.get("amsgrad", False))  # Adam's AMSGrad variant (training.optimizer adam)
        # kept: each client's optimiser state (Adam's moments, momentum) carries over to its next round, so a
        # centralised run of R rounds is one optimiser over R epochs; by default every round starts a new one
        self.keep_optimizer = t.get("keep_optimizer", False)
        self.client_optimizers: dict[int, dict] = {}  # client -> its optimiser's state after its last round
        self.seed = ctx.spec["seed"]
        dev = ctx.device
        self.x, self.y = ctx.data.train.x.to(dev), ctx.data.train.y.to(dev)
        self.x_test, self.y_test = ctx.data.test.x.to(dev), ctx.data.test.y.to(dev)
        domain = ctx.data.test.domain
        self.test_domain = None if domain is None else domain.to(dev)  # per-domain evaluation when present
        ev = ctx.spec.get("evaluation", {})
        # each client's model on its own test split (always on multi-domain data: FedBN's per-domain evaluation)
        self.per_client = bool(ev.get("per_client", False)) or self.test_domain is not None
        self.eval_weighting = ev.get("weighting", "clients")
        self.adapt_steps, self.adapt_lr = ev.get("adapt_steps", 0), ev.get("adapt_lr", 0.0)
        self.restrict_labels = bool(ev.get("restrict_to_client_labels", False))
        self.count_flops = bool(ev.get("local_flops", False))  # log the FLOPs of one local step per sample
        if self.restrict_labels and not self.per_client:
            raise SuiteError("evaluation.restrict_to_client_labels needs per-client evaluation (evaluation.per_client)")
        if self.restrict_labels and is_mask_target(ctx.data.test.y):
            raise SuiteError("evaluation.restrict_to_client_labels applies to classification, not to segmentation")
        self._client_tests = None

    @property
    def eval_parts(self) -> list[torch.Tensor]:
        """The clients per-client evaluation serves: the training clients, or those the algorithm kept aside in
        `RunContext.eval_parts` (the centralised ceiling, which trains one client holding them all)."""
        return self.ctx.parts if self.ctx.eval_parts is None else self.ctx.eval_parts

    def client_labels(self, client: int | None, test_idx: torch.Tensor) -> torch.Tensor:
        """The classes in `client`'s training data (sorted label ids), to which its predictions are restricted; its
        test split `test_idx` must hold no other class."""
        if client is None:
            raise SuiteError("evaluation.restrict_to_client_labels needs a client per test split")
        labels = torch.unique(self.y[self.eval_parts[client].to(self.y.device)])
        if not torch.isin(self.y_test[test_idx], labels).all():
            raise SuiteError(f"evaluation.restrict_to_client_labels: client {client}'s test split holds classes its "
                             f"training data does not (only splits drawn with its training labels can be restricted)")
        return labels

    @property
    def client_tests(self) -> list[torch.Tensor]:
        """The test split of each evaluation unit (indices into the test set, on the device), made once per run
        from its seed. Without domains the units are the clients (`eval_parts`: the partition's, also when the
        centralised ceiling pools them for training) and each gets the test samples of its classes in proportion to
        its training counts (`common.data.partition.client_test_split`). On multi-domain data the units are the
        domains, each with its test samples, served by the client holding that domain (`unit_client`; None when the
        partition does not give one client per domain)."""
        if self._client_tests is None:
            from common.data.partition import client_test_split
            from common.errors import SuiteError
            from common.fl.personal import client_of_domain
            data, parts = self.ctx.data, self.eval_parts
            if self.test_domain is not None:
                try:
                    self.unit_client = client_of_domain(data.train.domain, parts, len(data.domains))
                except SuiteError as e:
                    self.unit_client, self.unit_client_error = [None] * len(data.domains), str(e)
                tests = [torch.nonzero(data.test.domain == d).flatten() for d in range(len(data.domains))]
            else:
                self.unit_client = list(range(len(parts)))
                tests = client_test_split(data.train.y.cpu(), [p.cpu() for p in parts], data.test.y.cpu(),
                                          sub_seed(self.seed, 0x7E57))
            self._client_tests = [t.to(self.ctx.device) for t in tests]
        return self._client_tests

    def adapt(self, model: torch.nn.Module, client: int) -> torch.nn.Module:
        """`adapt_steps` SGD steps (lr `adapt_lr`, no momentum) of `model` on batches of the client's training
        data, drawn from a generator of their own (seed, evaluation round, client): training is not disturbed."""
        r = len(self.ctx.history.rounds) if self.ctx.history is not None else 0
        gen = torch.Generator().manual_seed(sub_seed(self.seed, r, client, 0xADA))
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=self.adapt_lr)
        model.train()
        per_epoch = math.ceil(len(self.ctx.parts[client]) / self.batch_size)
        batches = self.client_batches(client, math.ceil(self.adapt_steps / per_epoch), gen)
        minimise((self.algo.local_loss(model, x, y) for x, y in itertools.islice(batches, self.adapt_steps)), opt)
        return model

    def sample_clients(self, round_index: int) -> list[int]:
        n = len(self.ctx.parts)
        m = max(1, int(round(self.fraction * n)))
        rng = np.random.default_rng(sub_seed(self.seed, round_index, 0xC11E))
        return sorted(rng.choice(n, size=m, replace=False).tolist())

    def client_batches(self, client: int, epochs: int, generator: torch.Generator, also: tuple = ()):
        """The client's data in minibatches of `batch_size`: `epochs` passes, each in a fresh permutation drawn from
        `generator` when the pass begins. `also`: further per-training-sample tensors, batched alongside (x, y)."""
        idx = self.ctx.parts[client].to(self.ctx.device)
        x, y = self.x[idx], self.y[idx]
        extra = [t[idx] for t in also]
        for _ in range(epochs):
            perm = torch.randperm(len(y), generator=generator).to(self.ctx.device)
            for i in range(0, len(y), self.batch_size):
                b = perm[i:i + self.batch_size]
                yield (x[b], y[b], *[t[b] for t in extra]) if extra else (x[b], y[b])

    def make_optimizer(self, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
        """The local optimiser, new for every client and round (`training.keep_optimizer` then restores the client's
        state into it): `training.optimizer` sgd (default; with momentum and weight decay), adam (`training.amsgrad`:
        its AMSGrad variant), adamw or adafactor
        (torch's, e.g. prompt tuning's Adafactor at lr 0.3). Parameters whose requires_grad is off (a frozen
        pretrained model) get no gradient and are never changed."""
        params = [p for p in model.parameters() if p.requires_grad]
        if self.optimizer == "adam":  # FedDG's local optimiser (Adam, betas 0.9/0.999); FedGKT's with AMSGrad
            return torch.optim.Adam(params, lr=lr, weight_decay=self.weight_decay, amsgrad=self.amsgrad)
        if self.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=lr, weight_decay=self.weight_decay)
        if self.optimizer == "adafactor":
            return torch.optim.Adafactor(params, lr=lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(params, lr=lr, momentum=self.momentum, weight_decay=self.weight_decay)

    def local_train(self, client: int, round_index: int) -> tuple[float, int]:
        """Local SGD on one client's data; returns (mean training loss, nan/inf if it diverged; SGD steps)."""
        model, algo = self.ctx.model, self.algo
        gen = torch.Generator().manual_seed(sub_seed(self.seed, round_index, client))
        lr = self.lr if self.lr_decay == 1.0 else self.lr * self.lr_decay ** round_index
        self.ctx.round_lr = lr  # for hooks whose maths depends on it (SCAFFOLD's control update in end_client)
        opt = self.make_optimizer(model, lr)
        if client in self.client_optimizers:
            opt.load_state_dict(self.client_optimizers[client])
            for group in opt.param_groups:  # the state carries over, the round's learning rate applies
                group["lr"] = lr
        model.train()
        # `local_steps` minibatch steps instead of `local_epochs` passes: the first batches of the round's
        # permutations of the client's data (data-parallel SGD: one step per round)
        limit = self.local_steps
        per_epoch = math.ceil(len(self.ctx.parts[client]) / self.batch_size)
        batches = self.client_batches(client, self.epochs if limit is None else math.ceil(limit / per_epoch), gen)
        if limit is not None:
            batches = itertools.islice(batches, limit)
        result = minimise((algo.local_loss(model, x, y) for x, y in batches), opt, self.max_grad_norm)
        if self.keep_optimizer:
            self.client_optimizers[client] = opt.state_dict()
        return result

    def local_step_flops(self, client: int) -> float:
        """FLOPs of one local step's objective per training sample: the forward and backward pass of the algorithm's
        `local_loss` on the client's first `batch_size` samples, counted by torch.utils.flop_counter.FlopCounterMode
        (every aten operation, the frozen reference models of MOON and the like included). Called after
        `begin_client`; the model's state, its gradients and the global RNG are left as they were, so a run that
        counts trains exactly as one that does not."""
        from common.models.compute import counted_flops
        model = self.ctx.model
        idx = self.ctx.parts[client][:self.batch_size].to(self.ctx.device)
        saved = clone_state(model)
        model.train()
        flops = counted_flops(lambda: self.algo.local_loss(model, self.x[idx], self.y[idx]).backward(),
                              (self.ctx.device,) if self.ctx.device.type == "cuda" else ())
        model.zero_grad(set_to_none=True)
        model.load_state_dict(saved)
        return flops / len(idx)

    def save_checkpoint(self, path: Path, next_round: int, global_state: State, hist: History) -> None:
        """Everything needed to continue after `next_round - 1`, as plain data (tensors, numbers, strings, lists,
        dicts: `torch.load(weights_only=True)` reads it); written atomically (a kill never leaves half). A failed
        write (disk full) keeps the previous checkpoint, says so, and training goes on."""
        import dataclasses
        import json
        import sys
        tmp = path.with_name(f".{path.name}.tmp")
        # the history as the plain data it becomes in the results file (numbers, strings, lists, dicts)
        history = json.loads(json.dumps(dataclasses.asdict(hist)))
        try:
            # the global RNG too: what draws from it during training (dropout in a pretrained encoder) continues
            # from where the uninterrupted run is
            rng = {"cpu": torch.get_rng_state()}
            if self.ctx.device.type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state(self.ctx.device)
            torch.save({"format": "paperbench-checkpoint/2", "torch": str(torch.__version__), "run": self.ctx.spec,
                        "next_round": next_round, "global_state": global_state,
                        "algorithm": self.algo.checkpoint_state(), "history": history, "rng": rng,
                        "client_optimizers": self.client_optimizers}, tmp)
            os.replace(tmp, path)
        except (OSError, RuntimeError) as e:  # torch's zip writer reports a full disk as a RuntimeError
            tmp.unlink(missing_ok=True)
            print(f"warning: could not write checkpoint {path} after round {next_round} "
                  f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); the previous checkpoint is left as it "
                  f"was and training goes on", file=sys.stderr)

    def load_checkpoint(self, path: Path):
        """(next_round, global_state, history) saved in `path`, or None when the checkpoint cannot be used:
        unreadable (truncated, garbage), of another run spec, written by another torch version or in another
        format. Then a warning names the file and the run starts from round 0, so its result is the same as an
        uninterrupted run's (the checkpoint is overwritten after the first round)."""
        import sys
        reason, ck = None, None
        try:
            ck = torch.load(path, weights_only=True, map_location=self.ctx.device)
        except Exception as e:  # truncated zip, garbage bytes, a pickle of other objects: never fatal
            import zipfile
            if "Weights only load failed" in str(e) and zipfile.is_zipfile(path):  # a whole file, other content
                reason = ("holds objects other than tensors and plain data (written by an older version of the "
                          "suite?)")
            else:
                first_line = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
                reason = f"is unreadable ({type(e).__name__}: {first_line})"
        if reason is None:
            if not isinstance(ck, dict) or ck.get("format") != "paperbench-checkpoint/2":
                reason = "is in another checkpoint format (from an older version of the suite)"
            elif ck.get("torch") != str(torch.__version__):
                reason = f"was written by torch {ck.get('torch')}, this is torch {torch.__version__}"
            elif ck.get("run") != self.ctx.spec:
                reason = "belongs to another run spec"
        if reason is None:
            try:
                hist = History(**ck["history"])
                self.algo.restore_checkpoint_state(ck["algorithm"])
                self.client_optimizers = ck.get("client_optimizers", {})
                rng = ck.get("rng", {})  # absent in checkpoints of runs whose training draws nothing from it
                if "cpu" in rng:
                    torch.set_rng_state(rng["cpu"].cpu())
                if "cuda" in rng and self.ctx.device.type == "cuda":
                    torch.cuda.set_rng_state(rng["cuda"].cpu(), self.ctx.device)
                return ck["next_round"], ck["global_state"], hist
            except Exception as e:
                reason = f"does not fit this run's algorithm ({type(e).__name__}: {e})"
                # the algorithm may be half restored: set it up afresh, leaving the global RNG as the first set-up
                # left it (what the uninterrupted run continues from)
                self.client_optimizers = {}
                with torch.random.fork_rng(devices=[]):
                    self.algo.setup(self.ctx)
        print(f"warning: checkpoint {path} {reason}; ignoring it: the run starts again from round 0 (its result is "
              f"the same as without a checkpoint)", file=sys.stderr)
        return None

    def train(self, progress: bool = True, checkpoint: Path | None = None) -> History:
        """Train all rounds. With `checkpoint`, state is saved after every round and a run restarted after a
        crash continues from the last saved round, ending bit-identical to an uninterrupted run."""
        ctx, algo, hist = self.ctx, self.algo, History()
        ctx.history = hist
        algo.setup(ctx)
        global_state, first = clone_state(ctx.model), 0
        resumed = None
        if checkpoint is not None and Path(checkpoint).is_file():
            resumed = self.load_checkpoint(Path(checkpoint))  # None (with a warning) when it cannot be used
        if resumed is not None:
            first, global_state, hist = resumed
            ctx.history = hist
            hist.resumed_at.append(first)
        bar = tqdm(range(first, self.rounds), desc=f"{ctx.spec['method']['name']}", unit="round",
                   disable=not progress, leave=False, initial=first, total=self.rounds)
        for r in bar:
            started = time.perf_counter()
            sampled = algo.clients_of_round(self, r)
            algo.begin_round(self, r, sampled, global_state)
            states, weights, losses, down, up = [], [], [], [], []
            flops, counting = None, 0.0
            for k in sampled:
                ctx.model.load_state_dict(global_state)
                down.append(algo.download_bytes(global_state, k, r))
                algo.begin_client(ctx.model, global_state, k)
                if self.count_flops and flops is None:  # evaluation.local_flops: the round's first client
                    t0 = time.perf_counter()
                    flops = self.local_step_flops(k)
                    counting = time.perf_counter() - t0  # not part of the local work's time
                loss, steps = algo.train_client(self, k, r)
                losses.append(loss)
                algo.end_client(ctx.model, global_state, k, steps)
                states.append(clone_state(ctx.model))
                up.append(algo.upload_bytes(states[-1], k, r))
                weights.append(len(ctx.parts[k]))
            train_seconds = time.perf_counter() - started - counting
            train_loss = float(np.mean(losses))
            if not math.isfinite(train_loss):
                hist.status = "diverged"
                break
            global_state = algo.server_update(global_state, states, weights, r)
            metrics = algo.evaluate(self, global_state)
            acc, test_loss = metrics.pop("test_accuracy"), metrics.pop("test_loss")
            if not math.isfinite(test_loss):
                hist.status = "diverged"
                break
            hist.rounds.append(r + 1)
            hist.test_accuracy.append(acc)
            hist.test_loss.append(test_loss)
            hist.train_loss.append(train_loss)
            for key, value in metrics.items():
                hist.log(key, value)
            # communication of the round, per sampled client (common/fl/communication.py)
            hist.log("clients", sampled)
            hist.log("bytes_down", down)
            hist.log("bytes_up", up)
            hist.log("round_seconds", time.perf_counter() - started)
            hist.log("train_seconds", train_seconds)  # the clients' local work, one after another
            if flops is not None:
                hist.log("local_mflops", flops / 1e6)  # one local step, forward and backward, per sample
            bar.set_postfix(acc=f"{acc:.3f}")
            if checkpoint is not None:
                self.save_checkpoint(Path(checkpoint), r + 1, global_state, hist)
        self.final_state = global_state  # the last global model, kept for post-hoc methods (calibration)
        return hist
