"""MOON: the model-contrastive loss, the projection-head model, previous local models across rounds and resume."""
import copy
import math
import shutil

import pytest
import torch

from common.experiments import load_paper, resolve_cell
from common.fl import FederatedRun, RunContext, get_algorithm
from common.models import build_model
from common.data import load_dataset
from common.data.partition import partition
from common.fl.engine import clone_state
from common.train import execute
from papers.moon.method import model_contrastive_loss


def direct_l_con(z, z_glob, z_prev, tau):
    """The paper's formula evaluated element by element with plain arithmetic."""
    out = []
    for a, g, p in zip(z.tolist(), z_glob.tolist(), z_prev.tolist()):
        norm = lambda v: math.sqrt(sum(x * x for x in v))
        sim_g = sum(x * y for x, y in zip(a, g)) / (norm(a) * norm(g))
        sim_p = sum(x * y for x, y in zip(a, p)) / (norm(a) * norm(p))
        out.append(-math.log(math.exp(sim_g / tau) / (math.exp(sim_g / tau) + math.exp(sim_p / tau))))
    return sum(out) / len(out)


@pytest.mark.parametrize("tau", [0.5, 0.1, 2.0])
def test_contrastive_loss_matches_the_formula(tau):
    g = torch.Generator().manual_seed(1)
    z, z_glob, z_prev = (torch.randn(5, 7, generator=g, dtype=torch.float64) for _ in range(3))
    got = model_contrastive_loss(z, z_glob, z_prev, tau).item()
    assert got == pytest.approx(direct_l_con(z, z_glob, z_prev, tau), rel=1e-12)
    # the positive pulls: z equal to z_glob and opposite to z_prev gives the smallest loss
    assert model_contrastive_loss(z, z, -z, tau).item() < got < model_contrastive_loss(z, -z, z, tau).item()


def test_contrastive_loss_without_previous_model_is_zero():
    z = torch.randn(4, 3, requires_grad=True)
    assert model_contrastive_loss(z, torch.randn(4, 3), None, 0.5).item() == 0.0


def test_projection_head_model_exposes_features_projection_and_head():
    torch.manual_seed(0)
    m = build_model("cnn", in_channels=1, num_classes=10, input_size=28, channels=(6, 16), hidden=(120, 84),
                    projection=256)
    x = torch.randn(3, 1, 28, 28)
    h = m.features.encoder(x)
    z = m.features.projection(h)
    assert h.shape == (3, 84) and z.shape == (3, 256) and m.feature_dim == 256
    assert torch.equal(m.features(x), z) and torch.equal(m(x), m.head(z))
    assert [tuple(l.weight.shape) for l in m.features.projection if hasattr(l, "weight")] == [(84, 84), (256, 84)]


SPEC = {"dataset": {"name": "mnist5k", "train_limit": 600, "test_limit": 200},
        "partition": {"scheme": "dirichlet", "clients": 4, "alpha": 0.5, "min_size": 5},
        "model": {"name": "cnn", "norm": "none", "channels": [6, 16], "hidden": [120, 84], "projection": 64},
        "training": {"rounds": 3, "client_fraction": 1.0, "local_epochs": 1, "batch_size": 32, "lr": 0.1,
                     "momentum": 0.0, "weight_decay": 0.0},
        "seed": 0}


def metrics(spec):
    res = execute(spec, progress=False)
    return {k: res["metrics"][k] for k in ("test_accuracy", "test_loss", "train_loss")}


def test_moon_with_mu_zero_is_fedavg_exactly():
    fedavg = metrics({**SPEC, "method": {"name": "fedavg"}})
    assert metrics({**SPEC, "method": {"name": "moon", "mu": 0.0, "tau": 0.5}}) == fedavg
    # and the contrastive term matters once clients have a previous model (from round 2 on)
    moon = metrics({**SPEC, "method": {"name": "moon", "mu": 1.0, "tau": 0.5}})
    assert moon["train_loss"][0] == fedavg["train_loss"][0] and moon["train_loss"][1:] != fedavg["train_loss"][1:]


def make_run(spec):
    d = spec["dataset"]
    data = load_dataset(d["name"], "data", d["train_limit"], d["test_limit"])
    part = dict(spec["partition"])
    parts = partition(data.train.y, part.pop("scheme"), seed=spec["seed"], **part)

    def make_model():
        return build_model(in_channels=1, num_classes=10, input_size=28, **spec["model"])

    torch.manual_seed(spec["seed"])
    ctx = RunContext(spec=spec, data=data, parts=parts, model=make_model(), make_model=make_model,
                     device=torch.device("cpu"), data_root="data")
    return FederatedRun(ctx, get_algorithm(spec["method"]))


def test_clients_keep_their_previous_local_model():
    """The negative of a client is its own model after its last local training, also across skipped rounds; before
    its first training, the initial global model (none in the first round)."""
    spec = {**SPEC, "method": {"name": "moon", "mu": 1.0, "tau": 0.5},
            "training": {**SPEC["training"], "client_fraction": 0.5}}
    run = make_run(spec)
    initial = clone_state(run.ctx.model)
    algo, seen = run.algo, []
    begin, end = algo.begin_client, algo.end_client

    def begin_client(model, global_state, client):
        begin(model, global_state, client)
        prev = algo.prev.get(client)
        seen.append((client, None if prev is None else copy.deepcopy(prev),
                     {k: v.clone() for k, v in algo.prev_model.state_dict().items()} if algo.has_prev else None))

    ends = {}

    def end_client(model, global_state, client, steps):
        end(model, global_state, client, steps)
        ends.setdefault(client, []).append({k: v.clone() for k, v in model.state_dict().items()})

    algo.begin_client, algo.end_client = begin_client, end_client
    run.train(progress=False)
    trained, checked, first_timers = {}, 0, 0
    per_round = 2  # 4 clients, fraction 0.5
    for i, (client, prev, loaded) in enumerate(seen):
        if client in trained:
            last = trained[client]
            assert all(torch.equal(prev[k], last[k]) and torch.equal(loaded[k], last[k]) for k in last)
            checked += 1
        elif i < per_round:  # first round: no negative
            assert prev is None and loaded is None
        else:
            assert prev is None and all(torch.equal(loaded[k], initial[k]) for k in initial)
            first_timers += 1
        trained[client] = ends[client].pop(0)
    assert checked > 0 and first_timers > 0


def test_a_client_training_for_the_first_time_has_the_initial_model_as_negative():
    """Partial participation: a client first sampled after the first round has the initial global model as its
    previous model; its loss is CE + mu * l_con with that negative, evaluated directly with the formula."""
    mu, tau = 1.0, 0.5
    spec = {**SPEC, "method": {"name": "moon", "mu": mu, "tau": tau},
            "training": {**SPEC["training"], "client_fraction": 0.5}}
    run = make_run(spec)
    first = {}
    for r in range(spec["training"]["rounds"]):
        for k in run.sample_clients(r):
            first.setdefault(k, r)
    late = {k: r for k, r in first.items() if r >= 1}
    assert late, first
    initial = clone_state(run.ctx.model)
    algo, current, checked = run.algo, {}, []
    begin, loss_of, local_train = algo.begin_client, algo.local_loss, run.local_train

    def begin_client(model, global_state, client):
        begin(model, global_state, client)
        current.update(client=client, global_state={k: v.clone() for k, v in global_state.items()})

    def train_client(client, round_index):
        current["round"], current["first_batch"] = round_index, True
        return local_train(client, round_index)

    def local_loss(model, x, y):
        loss = loss_of(model, x, y)
        if current.pop("first_batch", False) and late.get(current["client"]) == current["round"]:
            with torch.no_grad():
                glob, prev = copy.deepcopy(model).eval(), copy.deepcopy(model).eval()
                glob.load_state_dict(current["global_state"])
                prev.load_state_dict(initial)
                z = model.features(x)
                ce = torch.nn.functional.cross_entropy(model.head(z), y).item()
                l_con = direct_l_con(z.double(), glob.features(x).double(), prev.features(x).double(), tau)
            assert l_con > 0.01
            assert loss.item() == pytest.approx(ce + mu * l_con, rel=1e-5)
            checked.append(current["client"])
        return loss

    algo.begin_client, algo.local_loss, run.local_train = begin_client, local_loss, train_client
    run.train(progress=False)
    assert sorted(checked) == sorted(late)


@pytest.mark.parametrize("fraction, resume_at", [(1.0, 2), (0.5, 1)])
def test_resume_from_a_checkpoint_is_bit_identical(tmp_path, fraction, resume_at):
    """The clients' previous models (and the initial one, the negative of a client that has not trained yet, as
    client 0 in the second round of the partial-participation run) are part of the checkpoint: resuming ends like
    the full run."""
    spec = {**SPEC, "method": {"name": "moon", "mu": 1.0, "tau": 0.5},
            "training": {**SPEC["training"], "client_fraction": fraction}}
    ref = make_run(spec)
    save = ref.save_checkpoint

    def save_and_copy(path, next_round, global_state, hist):
        save(path, next_round, global_state, hist)
        if next_round == resume_at:
            shutil.copy(path, tmp_path / "resume.pt")

    ref.save_checkpoint = save_and_copy
    h_ref = ref.train(progress=False, checkpoint=tmp_path / "ref.pt")
    saved = ref.algo.checkpoint_state()
    assert {"prev", "initial", "rounds_done"} <= set(saved.get("attributes", saved))
    resumed = make_run(spec)
    h = resumed.train(progress=False, checkpoint=tmp_path / "resume.pt")
    assert h.resumed_at == [resume_at]
    assert (h.test_accuracy, h.test_loss, h.train_loss) == (h_ref.test_accuracy, h_ref.test_loss, h_ref.train_loss)
    final, final_ref = clone_state(resumed.ctx.model), clone_state(ref.ctx.model)  # the last global model evaluated
    assert all(torch.equal(final[k], final_ref[k]) for k in final_ref)


def test_paper_yaml_gives_each_method_its_mu_per_dataset():
    paper = load_paper("moon")
    rows = [r["label"] for r in paper["tables"]["table1"]["rows"]]
    mus = {}
    for label in rows:
        for col in range(2):
            spec = resolve_cell(paper, "table1", rows.index(label), col, "paper").specs[0]
            mus[label, col] = spec["method"].get("mu")
    assert mus == {("MOON", 0): 5, ("MOON", 1): 1, ("FedProx", 0): 0.01, ("FedProx", 1): 0.001,
                   ("FedAvg", 0): None, ("FedAvg", 1): None, ("SCAFFOLD", 0): None, ("SCAFFOLD", 1): None,
                   ("SOLO", 0): None, ("SOLO", 1): None}
    tiny = resolve_cell(paper, "table1", 0, 2, "paper").specs[0]
    assert (tiny["dataset"]["name"], tiny["model"]["name"], tiny["training"]["rounds"], tiny["method"]["mu"]) == \
        ("tinyimagenet", "resnet18", 20, 1)
