"""Engine speed: this suite's federated engine against a plain PyTorch loop and Flower's simulation.

    python benchmarks/engine_speed.py                      # cnn and resnet8, 3 rounds, 1 torch thread
    python benchmarks/engine_speed.py --models cnn --rounds 5 --channels-last --batched-clients --profile

One fixed workload: FedAvg on MNIST 5k (4,000 training images, offline), Dirichlet(alpha=1) partition over 20
clients, client fraction C=0.4 (8 clients per round), 2 local epochs, batch 32, SGD lr 0.1, seed 0. The three
implementations see the identical data, partition, client sampling, initial model, batch order and seed:

  (a) engine  common.fl.FederatedRun, as the workflow runs it (`python -m common.train`);
  (b) plain   `plain_fedavg` below: a DataLoader per client, copy.deepcopy of the global model per client,
              state_dict averaging (what most FL code bases do);
  (a2) --batched-clients: the round's clients trained together, one torch.func.vmap over their stacked weights
              per step (the idea of batching clients; measured here, not in the engine: it was no faster);
  (c) flower  Flower's simulation runtime (Ray backend) running (b)'s client code as a ClientApp and Flower's
              FedAvg strategy, sampling the same clients; skipped with one line when flwr is not installed
              (`pip install -e '.[bench]'`).

Prints, per model, each implementation's first round in seconds and its mean wall and CPU seconds per round after
it (a round: local training of the sampled clients, aggregation, evaluation of the global model on the 1,000 test
images; CPU time, for Flower of all its processes, is the fair measure on a shared machine), the engine's
speed-up, the test accuracy after every round, the largest accuracy and weight differences between (a) and (b),
and the GFLOP per CPU second of local training next to this machine's float32 matmul rate. --profile adds
torch.profiler's most expensive operators for one engine round. Options that would change the engine's numbers
(--channels-last) are measured here, never enabled in the engine.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, Sampler, Subset, TensorDataset  # noqa: E402

from common.data import load_dataset  # noqa: E402
from common.data.partition import partition  # noqa: E402
from common.fl import FederatedRun, RunContext, get_algorithm  # noqa: E402
from common.fl.engine import sub_seed  # noqa: E402
from common.models import build_model  # noqa: E402

# The accuracy trajectories of (a) and (b) agree within this (absolute, per round): both train every client
# bit-identically, but the engine's server step x - 1.0 * (x - mean) rounds differently from the plain mean.
ACCURACY_TOLERANCE = 0.01


def workload(model: str, rounds: int = 3, seed: int = 0) -> dict:
    """The benchmark's run spec (same keys as a workflow run; FedDF's mini scale with 2 local epochs)."""
    return {
        "method": {"name": "fedavg"},
        "seed": seed,
        "dataset": {"name": "mnist5k"},
        "partition": {"scheme": "dirichlet", "clients": 20, "alpha": 1.0, "min_size": 10},
        "model": {"name": model, "norm": "bn"},
        "training": {"rounds": rounds, "client_fraction": 0.4, "local_epochs": 2, "batch_size": 32, "lr": 0.1,
                     "momentum": 0.0, "weight_decay": 0.0},
    }


def load(spec: dict):
    data = load_dataset(spec["dataset"]["name"])
    part = dict(spec["partition"])
    parts = partition(data.train.y, part.pop("scheme"), seed=spec["seed"], **part)
    return data, parts


def make_model(spec: dict, data) -> torch.nn.Module:
    m = spec["model"]
    return build_model(m["name"], in_channels=data.input_shape[0], num_classes=data.num_classes,
                       input_size=data.input_shape[-1], **{k: v for k, v in m.items() if k != "name"})


def initial_model(spec: dict, data) -> torch.nn.Module:
    torch.manual_seed(spec["seed"])  # as common.train.execute does
    return make_model(spec, data)


def sample_clients(spec: dict, round_index: int) -> list[int]:
    """The clients FederatedRun.sample_clients picks in this round."""
    n = spec["partition"]["clients"]
    m = max(1, int(round(spec["training"]["client_fraction"] * n)))
    rng = np.random.default_rng(sub_seed(spec["seed"], round_index, 0xC11E))
    return sorted(rng.choice(n, size=m, replace=False).tolist())


class Clock:
    """Wall and CPU seconds at the end of every round. CPU time counts this process (or, with `tree`, also its
    child processes: Ray's), so it is far less disturbed by other work on a shared machine than wall time."""

    def __init__(self, tree: bool = False):
        self.tree, self.stamps = tree, []
        self.tick()

    def tick(self) -> None:
        self.stamps.append((time.perf_counter(), self._cpu()))

    def _cpu(self) -> float:
        if not self.tree:
            return time.process_time()
        import psutil
        me = psutil.Process()
        total = 0.0
        for p in [me, *me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:  # exited meanwhile
                pass
        return total

    def rounds(self) -> dict:
        return {"round_seconds": [b[0] - a[0] for a, b in zip(self.stamps, self.stamps[1:])],
                "round_cpu": [b[1] - a[1] for a, b in zip(self.stamps, self.stamps[1:])]}


# --- (a) the engine ------------------------------------------------------------------------------------------
class TimedRun(FederatedRun):
    """FederatedRun that also adds up the time spent in local training (for the GFLOP/s figure)."""
    train_seconds = train_cpu = 0.0
    samples = 0

    def local_train(self, client, round_index):
        t, c = time.perf_counter(), time.process_time()
        out = super().local_train(client, round_index)
        self.train_seconds += time.perf_counter() - t
        self.train_cpu += time.process_time() - c
        self.samples += self.epochs * len(self.ctx.parts[client])
        return out


def run_engine(spec: dict, data, parts, channels_last: bool = False) -> dict:
    model = initial_model(spec, data)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ctx = RunContext(spec=spec, data=data, parts=parts, model=model, make_model=lambda: make_model(spec, data),
                     device=torch.device("cpu"), data_root="data")
    algo, states = get_algorithm(spec["method"]), []
    server_update = algo.server_update

    def recorded(*args):
        states.append(server_update(*args))
        return states[-1]

    def evaluate(*args):
        out = algo_evaluate(*args)
        clock.tick()  # the end of a round
        return out

    algo.server_update = recorded  # keeps each round's global state, to compare with (b)
    algo_evaluate, algo.evaluate = algo.evaluate, evaluate
    run = TimedRun(ctx, algo)
    clock = Clock()
    hist = run.train(progress=False)
    return {**clock.rounds(), "accuracy": hist.test_accuracy, "states": states,
            "train_seconds": run.train_seconds, "train_cpu": run.train_cpu, "samples": run.samples}


# --- (b) a plain PyTorch loop --------------------------------------------------------------------------------
class EpochShuffle(Sampler):
    """A new permutation from `gen` on every pass (RandomSampler draws two per pass, so its order differs)."""

    def __init__(self, n: int, gen: torch.Generator):
        self.n, self.gen = n, gen

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=self.gen).tolist())

    def __len__(self):
        return self.n


def plain_local_train(global_model, dataset, seed: int, round_index: int, client: int, t: dict):
    """One client's local SGD, the usual way; returns (state_dict, number of samples)."""
    gen = torch.Generator().manual_seed(sub_seed(seed, round_index, client))
    loader = DataLoader(dataset, batch_size=t["batch_size"], sampler=EpochShuffle(len(dataset), gen))
    model = copy.deepcopy(global_model)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=t["lr"], momentum=t["momentum"], weight_decay=t["weight_decay"])
    for _ in range(t["local_epochs"]):
        for xb, yb in loader:
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    return model.state_dict(), len(dataset)


def average(states: list[dict], sizes: list[int]) -> dict:
    """Sample-weighted mean of the clients' state_dicts (integer BN counters: the first client's)."""
    w = [s / sum(sizes) for s in sizes]
    return {k: sum(wi * s[k].double() for wi, s in zip(w, states)).to(v.dtype) if v.is_floating_point() else v
            for k, v in states[0].items()}


@torch.no_grad()
def test_accuracy(model, test_loader) -> float:
    model.eval()
    correct = sum((model(xb).argmax(1) == yb).sum().item() for xb, yb in test_loader)
    return correct / len(test_loader.dataset)


def plain_fedavg(spec: dict, data, parts) -> dict:
    t = spec["training"]
    train = TensorDataset(data.train.x, data.train.y)
    clients = [Subset(train, p.tolist()) for p in parts]
    test_loader = DataLoader(TensorDataset(data.test.x, data.test.y), batch_size=1000)
    global_model = initial_model(spec, data)
    accs, states, clock = [], [], Clock()
    for r in range(t["rounds"]):
        results = [plain_local_train(global_model, clients[k], spec["seed"], r, k, t) for k in sample_clients(spec, r)]
        global_model.load_state_dict(average(*zip(*results)))
        accs.append(test_accuracy(global_model, test_loader))
        clock.tick()
        states.append(copy.deepcopy(global_model.state_dict()))
    return {**clock.rounds(), "accuracy": accs, "states": states}


# --- (a2) the round's clients trained together (torch.func.vmap), measured, not in the engine ---------------
def batched_local_train(model, x, y, parts, clients: list[int], spec: dict, round_index: int, global_state: dict):
    """Local SGD of all `clients` at once: their parameters and buffers stacked, one vmap(functional_call) per step
    (a convolution with per-client weights becomes a grouped convolution), each client's batches in the engine's
    order. Clients whose step has the same batch size run together (no padding). Plain SGD, as in the workload.
    Returns each client's final state."""
    t = spec["training"]
    assert t["momentum"] == 0 and t["weight_decay"] == 0, "the benchmark's workload uses plain SGD"
    plans = []
    for k in clients:
        idx = parts[k]
        gen = torch.Generator().manual_seed(sub_seed(spec["seed"], round_index, k))
        plans.append([idx[perm[i:i + t["batch_size"]]] for perm in
                      (torch.randperm(len(idx), generator=gen) for _ in range(t["local_epochs"]))
                      for i in range(0, len(idx), t["batch_size"])])
    params = [n for n, _ in model.named_parameters()]
    stacked = {n: v.unsqueeze(0).repeat(len(clients), *[1] * v.dim()) for n, v in global_state.items()}
    model.train()
    loss = torch.func.vmap(lambda p, b, xb, yb: F.cross_entropy(torch.func.functional_call(model, (p, b), (xb,)), yb))
    for step in range(max(map(len, plans))):
        groups: dict[int, list[int]] = {}
        for i, plan in enumerate(plans):
            if step < len(plan):
                groups.setdefault(len(plan[step]), []).append(i)
        for size, members in groups.items():
            sel = torch.tensor(members)
            p = {n: stacked[n][sel].requires_grad_(True) for n in params}
            b = {n: v[sel] for n, v in stacked.items() if n not in p}  # BN statistics, updated in place per client
            batch = torch.cat([plans[i][step] for i in members])
            losses = loss(p, b, x[batch].view(len(members), size, *x.shape[1:]), y[batch].view(len(members), size))
            grads = torch.autograd.grad(losses.sum(), [p[n] for n in params])
            with torch.no_grad():
                for n, g in zip(params, grads):
                    stacked[n][sel] = p[n] - t["lr"] * g
                for n, v in b.items():
                    stacked[n][sel] = v
    return [{n: v[i].clone() for n, v in stacked.items()} for i in range(len(clients))]


def run_batched(spec: dict, data, parts) -> dict:
    """FedAvg with (a2)'s local training, the engine's aggregation and evaluation."""
    from common.fl.algorithms import weighted_mean
    from common.fl.engine import evaluate
    model = initial_model(spec, data)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    accs, states, clock = [], [], Clock()
    for r in range(spec["training"]["rounds"]):
        clients = sample_clients(spec, r)
        local = batched_local_train(model, data.train.x, data.train.y, parts, clients, spec, r, state)
        state = weighted_mean(local, [len(parts[k]) for k in clients])
        model.load_state_dict(state)
        accs.append(evaluate(model, data.test.x, data.test.y)[0])
        clock.tick()
        states.append(state)
    return {**clock.rounds(), "accuracy": accs, "states": states}


# --- (c) Flower's simulation (Ray backend) -------------------------------------------------------------------
def flower_available() -> str | None:
    """None when flwr with its simulation extra is importable, else the reason."""
    try:
        import flwr  # noqa: F401
        import ray  # noqa: F401
        from flwr.simulation import run_simulation  # noqa: F401
    except ImportError as e:
        return f"{e.name or e} is not installed (pip install -e '.[bench]')"
    return None


def run_flower(spec: dict, data, parts, threads: int) -> dict:
    """FedAvg in Flower's simulation runtime: Ray actors run ClientApps (b's local training), the ServerApp runs
    Flower's FedAvg with the engine's client sampling and evaluates the global model centrally every round.
    Ray gets `threads` CPUs, one per actor, each actor one torch thread; Ray's start-up is not in the rounds."""
    import logging

    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    logging.getLogger("flwr").setLevel(logging.ERROR)  # run_simulation's deprecation notice
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    out = {"accuracy": []}
    clocks = []
    t = spec["training"]
    client_app = ClientApp()

    @client_app.query()
    def which(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"m": MetricRecord({"partition": int(context.node_config["partition-id"])})}),
                       reply_to=msg)

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        k = int(context.node_config["partition-id"])
        cached = _actor_data(spec)
        model = make_model(spec, cached["data"])
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        state, n = plain_local_train(model, cached["clients"][k], spec["seed"],
                                     int(msg.content["config"]["server-round"]) - 1, k, t)
        return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-examples": n})}),
                       reply_to=msg)

    class SameClients(FedAvg):
        """Flower's FedAvg, sampling the clients the engine samples (partition ids mapped to node ids once)."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.node_of: dict[int, int] = {}

        def configure_train(self, server_round, arrays, config, grid):
            deadline = time.monotonic() + 120
            while len(self.node_of) < len(parts):  # first round: ask every node for its partition id
                if time.monotonic() > deadline:
                    raise RuntimeError(f"flower: only {len(self.node_of)} of {len(parts)} nodes answered")
                time.sleep(0.1)  # nodes register as the simulation starts
                q = [Message(RecordDict({"c": ConfigRecord({})}), dst_node_id=n, message_type=MessageType.QUERY)
                     for n in set(grid.get_node_ids()) - set(self.node_of.values())]
                for reply in grid.send_and_receive(q):
                    if reply.has_error():
                        print(f"flower: node {reply.metadata.src_node_id}: {reply.error.reason}", file=sys.stderr)
                    else:
                        self.node_of[int(reply.content["m"]["partition"])] = reply.metadata.src_node_id
            config["server-round"] = server_round
            return self._construct_messages(RecordDict({"arrays": arrays, "config": config}),
                                            [self.node_of[k] for k in sample_clients(spec, server_round - 1)],
                                            MessageType.TRAIN)

    server_app = ServerApp()
    test_loader = DataLoader(TensorDataset(data.test.x, data.test.y), batch_size=1000)

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        model = initial_model(spec, data)

        def evaluate(server_round: int, arrays: ArrayRecord):
            if server_round == 0:  # called before the first round
                clocks.append(Clock(tree=True))
            else:
                model.load_state_dict(arrays.to_torch_state_dict())
                out["accuracy"].append(test_accuracy(model, test_loader))
                clocks[0].tick()
            return MetricRecord({})

        SameClients(fraction_evaluate=0.0, min_available_nodes=len(parts)).start(
            grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=t["rounds"], evaluate_fn=evaluate)

    started = time.perf_counter()
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=len(parts),
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": threads, "include_dashboard": False,
                                                 "logging_level": logging.ERROR, "log_to_driver": False}})
    return {**out, **clocks[0].rounds(), "total_seconds": time.perf_counter() - started}


_ACTOR_CACHE: dict = {}


def _actor_data(spec: dict) -> dict:
    """Data and client datasets, loaded once per Ray actor process."""
    if not _ACTOR_CACHE:
        data, parts = load(spec)
        train = TensorDataset(data.train.x, data.train.y)
        _ACTOR_CACHE.update(data=data, clients=[Subset(train, p.tolist()) for p in parts])
    return _ACTOR_CACHE


# --- FLOPs, matmul peak, profile ---------------------------------------------------------------------------------
def train_flops_per_sample(spec: dict, data) -> float:
    """FLOPs of one forward + backward pass per sample (torch's flop counter, one batch)."""
    from torch.utils.flop_counter import FlopCounterMode
    model = make_model(spec, data).train()
    b = spec["training"]["batch_size"]
    with FlopCounterMode(display=False) as fc:
        F.cross_entropy(model(data.train.x[:b]), data.train.y[:b]).backward()
    return fc.get_total_flops() / b


def matmul_gflops(n: int = 2048, repeat: int = 5) -> float:
    """Best float32 torch.mm rate at the current thread count, in GFLOP per CPU second (per core busy: CPU time,
    like the training figure, so that other work on the shared machine does not lower it)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(_cpu_timed(lambda: torch.mm(a, b)) for _ in range(repeat))
    return 2 * n ** 3 / best / 1e9


def _cpu_timed(fn) -> float:
    t = time.process_time()
    fn()
    return time.process_time() - t


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


KERNELS = {"convolution": ("convolution",), "batch norm": ("batch_norm",), "pooling": ("pool",),
           "ReLU": ("clamp_min", "threshold_backward", "relu"),
           "linear + loss": ("addmm", "aten::mm", "softmax", "nll")}


def profile_engine(spec: dict, data, parts, rows: int = 12) -> str:
    """torch.profiler's operators by self CPU time over one engine round (after one warm-up round), and the
    shares of the round's wall time spent in each kind of compute kernel."""
    from torch.profiler import ProfilerActivity, profile
    spec = {**spec, "training": {**spec["training"], "rounds": 1}}
    run_engine(spec, data, parts)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        wall = _timed(lambda: run_engine(spec, data, parts))
    events = prof.key_averages()
    share = {k: sum(e.self_cpu_time_total for e in events if any(n in e.key for n in names)) / 1e6 / wall
             for k, names in KERNELS.items()}
    ops = sum(e.self_cpu_time_total for e in events) / 1e6 / wall
    summary = (f"one round {wall:.2f} s wall (profiled): " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in share.items())
               + f"; all other operators {100 * (ops - sum(share.values())):.0f}% (optimizer, indexing, copies, "
               f"averaging); outside operators (Python, autograd bookkeeping) {100 * (1 - ops):.0f}%")
    return events.table(sort_by="self_cpu_time_total", row_limit=rows) + "\n" + summary


def weight_diffs(a: list[dict], b: list[dict]) -> list[float]:
    """Per round, the largest absolute difference between two global states' floating-point entries."""
    return [max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa if sa[k].is_floating_point())
            for sa, sb in zip(a, b)]


# --- the table ---------------------------------------------------------------------------------------------------
def steady(xs: list[float]) -> float:
    """Seconds per round after the first (round 1 also pays start-up: Ray actors importing torch and loading the
    data, oneDNN building its kernels)."""
    return statistics.mean(xs[1:]) if len(xs) > 1 else float("nan")


def compare(model: str, rounds: int, threads: int, flower: bool, channels_last: bool, batched: bool,
            profile: bool) -> dict:
    spec = workload(model, rounds)
    data, parts = load(spec)
    torch.set_num_threads(threads)
    res = {"engine": run_engine(spec, data, parts), "plain": plain_fedavg(spec, data, parts)}
    if channels_last:
        res["engine, channels_last"] = run_engine(spec, data, parts, channels_last=True)
    if batched:
        res["clients batched (vmap)"] = run_batched(spec, data, parts)
    if flower:
        res["flower"] = run_flower(spec, data, parts, threads)
        torch.set_num_threads(threads)
    sec = {k: steady(v["round_seconds"]) for k, v in res.items()}
    cpu = {k: steady(v["round_cpu"]) for k, v in res.items()}
    e = res["engine"]
    flops = train_flops_per_sample(spec, data)
    gflops = flops * e["samples"] / e["train_cpu"] / 1e9  # per CPU second

    t = spec["training"]
    print(f"\n## {model}: FedAvg, MNIST 5k, 20 clients (Dirichlet 1.0), C=0.4, E={t['local_epochs']}, "
          f"batch {t['batch_size']}, lr {t['lr']}, {rounds} rounds, {threads} torch thread(s)")
    print(f"{'implementation':<22}{'round 1 s':>10}{'s/round':>9}{'CPU s/round':>12}{'engine speed-up':>16}"
          f"{'(CPU)':>7}   test accuracy per round")
    for k, v in res.items():
        print(f"{k:<22}{v['round_seconds'][0]:>10.2f}{sec[k]:>9.3f}{cpu[k]:>12.3f}{sec[k] / sec['engine']:>15.2f}x"
              f"{cpu[k] / cpu['engine']:>6.2f}x   " + " ".join(f"{a:.3f}" for a in v["accuracy"]))
    print(f"(s/round, CPU s/round: means over rounds 2-{rounds}, wall and CPU time (Flower: of all its processes); "
          "engine speed-up: the row's time / the engine's)")
    diff = max(abs(a - b) for a, b in zip(e["accuracy"], res["plain"]["accuracy"]))
    ok = "within" if diff <= ACCURACY_TOLERANCE else "OUTSIDE"
    print(f"accuracy engine vs plain: max |difference| over rounds {diff:.4f} ({ok} tolerance {ACCURACY_TOLERANCE})")
    print("global weights engine vs plain, max |difference| after each round: "
          + " ".join(f"{d:.1e}" for d in weight_diffs(e["states"], res["plain"]["states"])))
    if "engine, channels_last" in res:
        print("global weights engine vs engine with channels_last, max |difference| after each round: "
              + " ".join(f"{d:.1e}" for d in weight_diffs(e["states"], res["engine, channels_last"]["states"])))
    if "clients batched (vmap)" in res:
        print("global weights engine vs clients batched, max |difference| after each round: "
              + " ".join(f"{d:.1e}" for d in weight_diffs(e["states"], res["clients batched (vmap)"]["states"])))
    if "flower" in res:
        print(f"flower wall time incl. Ray start-up: {res['flower']['total_seconds']:.1f} s")
    print(f"local training (engine): {flops / 1e6:.2f} MFLOP per sample (forward+backward), {e['samples']} samples "
          f"in {e['train_cpu']:.2f} CPU s ({e['train_seconds']:.2f} s wall) = {gflops:.2f} GFLOP per CPU second "
          f"({100 * gflops / PEAK[threads]:.1f}% of the {PEAK[threads]:.1f} of float32 matmul), "
          f"{flops * e['samples'] / e['train_seconds'] / 1e9:.2f} GFLOP/s of wall time")
    if profile:
        print(f"\nprofile of one engine round ({model}), top operators by self CPU time:")
        print(profile_engine(spec, data, parts))
    return {"seconds": sec, "cpu_seconds": cpu, "gflops": gflops, "accuracy_diff": diff}


PEAK: dict[int, float] = {}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["cnn", "resnet8"])
    ap.add_argument("--rounds", type=int, default=3, help="at least 2 (round 1 is reported apart)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (Flower: Ray CPUs, 1 thread per actor)")
    ap.add_argument("--no-flower", action="store_true", help="skip (c)")
    ap.add_argument("--channels-last", action="store_true",
                    help="also time the engine with a channels_last model (changes numbers: not the default)")
    ap.add_argument("--batched-clients", action="store_true",
                    help="also time FedAvg with the round's clients trained together through torch.func.vmap (a2)")
    ap.add_argument("--profile", action="store_true", help="profile one engine round per model")
    args = ap.parse_args(argv)
    if args.rounds < 2:
        ap.error("--rounds must be at least 2")
    torch.set_num_threads(args.threads)
    PEAK[args.threads] = matmul_gflops()
    print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, {args.threads} torch thread(s); "
          f"float32 matmul peak (2048x2048 torch.mm) {PEAK[args.threads]:.1f} GFLOP per CPU second")
    flower = not args.no_flower
    if flower and (why := flower_available()):
        print(f"Flower: skipped, {why}")
        flower = False
    for model in args.models:
        compare(model, args.rounds, args.threads, flower, args.channels_last, args.batched_clients, args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
