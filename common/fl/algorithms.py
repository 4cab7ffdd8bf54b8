"""Federated algorithms as hooks into the one loop in `engine.py`.

An algorithm supplies (a) the client's local objective and (b) the server update. The base class is FedAvg:
clients minimise cross-entropy with SGD; the server treats the averaged client change as a pseudo-gradient and
steps a torch optimiser on the global weights. FedAvg is that step with SGD(lr=1), FedAvgM adds server momentum,
FedProx adds a proximal term to the local objective. Papers register their own algorithms with
`@register_algorithm("name")` in `papers/<paper>/method.py`.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from common.errors import SuiteError
from common.fl.communication import state_bytes
from common.segmentation import is_mask_target, segmentation_loss

if TYPE_CHECKING:
    from common.fl.engine import FederatedRun, RunContext

State = dict[str, torch.Tensor]

ALGORITHMS: dict[str, type["Algorithm"]] = {}


def registrar(registry: dict[str, type]):
    """A class decorator factory: `@register("name")` adds the class to `registry` under that name."""
    def register(name: str):
        def deco(cls):
            cls.name = name
            registry[name] = cls
            return cls
        return deco
    return register


register_algorithm = registrar(ALGORITHMS)


def get_algorithm(spec: dict) -> "Algorithm":
    """Instantiate the algorithm named by `spec['name']` with the remaining keys as its hyper-parameters."""
    return build_registered(ALGORITHMS, spec, "method")


def build_registered(registry: dict[str, type], spec: dict, kind: str):
    """Instantiate `registry[spec['name']]` with the remaining keys of `spec` as its parameters. Papers register
    their own classes when their `method.py` is imported, so every paper's module is imported before a name is
    declared unknown. An unknown name or parameter is one clear error."""
    name, params = spec["name"], {k: v for k, v in spec.items() if k != "name"}
    if name not in registry:
        _import_paper_methods()
    if name not in registry:
        raise SuiteError(f"unknown {kind} '{name}'; known {kind}s: {', '.join(sorted(registry)) or 'none'}")
    cls = registry[name]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = set(params) - accepted
    if unknown:
        raise SuiteError(f"{kind} '{name}' has no parameter(s) {', '.join(sorted(unknown))}; "
                         f"it accepts {', '.join(sorted(accepted)) or 'none'}")
    return cls(**params)


def _import_paper_methods() -> None:
    import papers
    for mod in pkgutil.iter_modules(papers.__path__):
        if importlib.util.find_spec(f"papers.{mod.name}.method"):
            importlib.import_module(f"papers.{mod.name}.method")


def weighted_mean(states: list[State], weights: list[float]) -> State:
    """Sample-weighted average of client states; integer buffers (BN batch counters) are taken from client 0."""
    w = torch.tensor(weights, dtype=torch.float64)
    w = (w / w.sum()).tolist()
    out = {}
    for key, ref in states[0].items():
        if ref.is_floating_point():
            acc = torch.zeros_like(ref, dtype=torch.float64)
            for s, wi in zip(states, w):
                acc += wi * s[key].double()
            out[key] = acc.to(ref.dtype)
        else:
            out[key] = ref.clone()
    return out


def task_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The supervised loss of the model's output: cross-entropy for class labels (N,), the segmentation loss
    (soft Dice, common/segmentation.py) for masks (N, S, H, W)."""
    if is_mask_target(y):
        return segmentation_loss(out, y)
    return F.cross_entropy(out, y)


@register_algorithm("fedavg")
class Algorithm:
    """FedAvg (McMahan et al. 2017) with an optional server optimiser on the pseudo-gradient."""
    name = "fedavg"
    # Attributes rebuilt by `setup` (data, scratch models, the run context): not saved in checkpoints.
    transient: tuple[str, ...] = ("ctx", "param_names")

    def __init__(self, server_lr: float = 1.0, server_momentum: float = 0.0):
        self.server_lr = server_lr
        self.server_momentum = server_momentum

    # --- set-up ------------------------------------------------------------------------------------------------
    def setup(self, ctx: "RunContext") -> None:
        """Called once before round 0 with the run's model, data and settings."""
        self.ctx = ctx
        self.param_names = [n for n, _ in ctx.model.named_parameters()]
        self.server_params = [p.detach().clone().requires_grad_(True) for p in ctx.model.parameters()]
        self.server_opt = self.make_server_optimizer(self.server_params)

    def make_server_optimizer(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=self.server_lr, momentum=self.server_momentum)

    def checkpoint_state(self) -> dict:
        """The algorithm's evolving state (server optimiser, per-client state, ...), saved after every round as
        plain data that `torch.load(weights_only=True)` reads: {"attributes": ..., "optimizers": ...}.

        Every attribute not listed in `transient` is saved, so subclasses that keep state across rounds
        (control variates, personal layers) are resumable without extra code: tensors (detached), numbers,
        strings, None and lists, tuples, sets and dicts of them as they are, a torch optimiser as its
        `state_dict()`. Any other object (a model, a generator) is an error naming the attribute: list it in
        `transient` when `setup` rebuilds it."""
        import numpy as np

        def plain(value, where: str):
            if isinstance(value, torch.Tensor):
                return value.detach()
            if value is None or isinstance(value, (bool, int, float, str)):
                return value
            if isinstance(value, np.generic):
                return value.item()
            if isinstance(value, dict):
                return {k: plain(v, f"{where}[{k!r}]") for k, v in value.items()}
            if isinstance(value, (list, tuple, set, frozenset)):
                return type(value)(plain(v, f"{where}[{i}]") for i, v in enumerate(value))
            raise TypeError(f"{where} ({type(value).__name__}) cannot be saved in a checkpoint as plain data; "
                            f"list it in {type(self).__name__}.transient if setup() rebuilds it")

        attributes, optimizers = {}, {}
        for key, value in vars(self).items():
            if key in self.transient:
                continue
            if isinstance(value, torch.optim.Optimizer):
                optimizers[key] = value.state_dict()
            else:
                attributes[key] = plain(value, f"{type(self).__name__}.{key}")
        return {"attributes": attributes, "optimizers": optimizers}

    def restore_checkpoint_state(self, state: dict) -> None:
        """Inverse of `checkpoint_state`, called after `setup`. Tensors are copied into those `setup` made (so an
        optimiser keeps pointing at its parameters) where shape and dtype agree, other attributes are replaced,
        optimisers load their state_dict. Checks first, so a checkpoint that does not fit changes nothing."""
        attributes, optimizers = state["attributes"], state["optimizers"]
        for key in optimizers:
            if not isinstance(getattr(self, key, None), torch.optim.Optimizer):
                raise ValueError(f"the checkpoint has an optimiser {key!r} this algorithm does not have")

        def restored(current, saved):
            if (isinstance(current, torch.Tensor) and isinstance(saved, torch.Tensor)
                    and current.shape == saved.shape and current.dtype == saved.dtype):
                with torch.no_grad():
                    current.copy_(saved)
                return current
            if isinstance(current, list) and isinstance(saved, list) and len(current) == len(saved):
                current[:] = [restored(c, s) for c, s in zip(current, saved)]
                return current
            return saved

        for key, sd in optimizers.items():  # validate every optimiser state before changing anything
            opt = getattr(self, key)
            if [len(g["params"]) for g in opt.param_groups] != [len(g["params"]) for g in sd["param_groups"]]:
                raise ValueError(f"the checkpoint's optimiser {key!r} has other parameters")
        for key, value in attributes.items():
            setattr(self, key, restored(getattr(self, key, None), value))
        for key, sd in optimizers.items():
            getattr(self, key).load_state_dict(sd)

    # --- communication (common/fl/communication.py) ---------------------------------------------------------------
    def transmitted_keys(self, state: State) -> list[str]:
        """The state entries that travel between server and clients (all of them in FedAvg)."""
        return list(state)

    def download_bytes(self, global_state: State, client: int, round_index: int) -> int:
        """Bytes the client receives at the start of the round: the global model's transmitted entries, dense."""
        return state_bytes(global_state, self.transmitted_keys(global_state))

    def upload_bytes(self, client_state: State, client: int, round_index: int) -> int:
        """Bytes the client sends after local training: its model's transmitted entries, dense."""
        return state_bytes(client_state, self.transmitted_keys(client_state))

    # --- client side -------------------------------------------------------------------------------------------
    def clients_of_round(self, run: "FederatedRun", round_index: int) -> list[int]:
        """The clients that train in this round: a random `client_fraction` of them (methods that visit clients
        in a fixed order, such as TDGAN's one centre per stage, choose their own)."""
        return run.sample_clients(round_index)

    def begin_round(self, run: "FederatedRun", round_index: int, clients: list[int], global_state: State) -> None:
        """Called once per round after the clients are chosen, before any of them receives the global model (a
        method whose clients train together, step by step, such as FeSTA's split learning, trains them here)."""

    def train_client(self, run: "FederatedRun", client: int, round_index: int) -> tuple[float, int]:
        """The client's local work between receiving the global model and sending its own: the engine's local
        SGD (`FederatedRun.local_train`). Returns (mean training loss, steps)."""
        return run.local_train(client, round_index)

    def begin_client(self, model: torch.nn.Module, global_state: State, client: int) -> None:
        """Called after the client's model was loaded with the global state, before local training."""

    def local_loss(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return task_loss(model(x), y)

    def end_client(self, model: torch.nn.Module, global_state: State, client: int, steps: int) -> None:
        """Called after local training (`steps` SGD steps), before the client's state is collected; the learning
        rate those steps used (the round's, after lr decay) is `self.ctx.round_lr`."""

    # --- evaluation ----------------------------------------------------------------------------------------------
    def evaluate(self, run: "FederatedRun", global_state: State) -> dict[str, float]:
        """Metrics of the new global model; must include test_accuracy and test_loss (on a multi-domain dataset:
        their means over domains, plus per-domain metrics). Personalised methods override this (e.g. to evaluate
        each client's own model on its own test data)."""
        from common.fl.engine import evaluate, evaluate_clients
        run.ctx.model.load_state_dict(global_state)
        if run.per_client:  # the global model on each client's own test split
            def global_model(client: int) -> torch.nn.Module:
                run.ctx.model.load_state_dict(global_state)  # afresh for each client: adaptation changes it
                return run.ctx.model
            return evaluate_clients(run, global_model)
        acc, loss = evaluate(run.ctx.model, run.x_test, run.y_test)
        return {"test_accuracy": acc, "test_loss": loss}

    # --- server side -------------------------------------------------------------------------------------------
    def server_update(self, global_state: State, client_states: list[State], weights: list[float],
                      round_index: int) -> State:
        """New global state from the sampled clients' states: one server-optimiser step on x_t - mean(x_i)."""
        avg = weighted_mean(client_states, weights)
        new = dict(avg)  # buffers (BN statistics) are averaged directly
        with torch.no_grad():
            for name, p in zip(self.param_names, self.server_params):
                # the global model may have been changed after the last step (e.g. by FedDF's distillation)
                p.copy_(global_state[name])
                p.grad = (global_state[name] - avg[name]).to(p.dtype)
        self.server_opt.step()
        for name, p in zip(self.param_names, self.server_params):
            new[name] = p.detach().clone()
        return new


@register_algorithm("fedavgm")
class FedAvgM(Algorithm):
    """FedAvg with server momentum (Hsu et al. 2019): v <- beta v + Delta; x <- x - server_lr v."""

    def __init__(self, beta: float = 0.9, server_lr: float = 1.0):
        super().__init__(server_lr=server_lr, server_momentum=beta)


@register_algorithm("fedprox")
class FedProx(Algorithm):
    """FedProx (Li et al. 2020): local objective + mu/2 ||w - w_global||^2."""

    def __init__(self, mu: float = 0.01, server_lr: float = 1.0):
        super().__init__(server_lr=server_lr)
        self.mu = mu

    def begin_client(self, model, global_state, client):
        self.anchor = [p.detach().clone() for p in model.parameters()]

    def local_loss(self, model, x, y):
        prox = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), self.anchor))
        return super().local_loss(model, x, y) + 0.5 * self.mu * prox


@register_algorithm("centralised")
class Centralised(Algorithm):
    """The ceiling of a federated table: the same model trained on the pooled data of every client (one client
    holding the union of the partition), for the same rounds x local epochs, evaluated like the global model. The
    partition's clients stay the units of per-client evaluation (`RunContext.eval_parts`): with
    `evaluation.per_client` the pooled model is evaluated on each client's own test split, as a personalised
    table's cells are (and with `restrict_to_client_labels`, only among the classes the client trains on)."""

    def setup(self, ctx):
        super().setup(ctx)
        if getattr(ctx, "eval_parts", None) is None:  # a second set-up (a checkpoint that did not fit) finds them kept
            ctx.eval_parts = list(ctx.parts)
        ctx.parts[:] = [torch.cat(ctx.parts).sort().values]
