"""Personalised FL (FedPer, LG-FedAvg, Per-FedAvg, pFedHN) and the per-client evaluation they share with FedBN:
each piece of maths against an independent computation on a tiny problem, and resume from a checkpoint."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.data import Dataset, Split
from common.data.partition import client_test_split, shards
from common.errors import SuiteError
from common.fl import FederatedRun, RunContext, get_algorithm
from common.fl.algorithms import weighted_mean
from common.fl.engine import sub_seed
from common.fl.personal import LGFedAvg, last_layers_keys, moreau_step
from common.models import Classifier, build_model
from common.results import repeatable_part
from common.train import execute
from papers.fedper.method import FedPer
from papers.perfedavg.method import hessian_vector_product, meta_step
from papers.pfedhn.method import HyperNetwork, PFedHN, hypernetwork_gradient


# --- per-client test splits ---------------------------------------------------------------------------------------
def test_client_test_splits_follow_each_clients_label_distribution_and_are_disjoint():
    g = torch.Generator().manual_seed(0)
    y_train = torch.arange(10).repeat_interleave(60)[torch.randperm(600, generator=g)]
    y_test = torch.arange(10).repeat_interleave(30)
    parts = shards(y_train, clients=4, shards_per_client=2, seed=1)  # classes straddle shards
    tests = client_test_split(y_train, parts, y_test, seed=3)
    all_idx = torch.cat(tests)
    assert len(all_idx) == len(torch.unique(all_idx)) == 300  # disjoint, and every class is held by someone
    for p, t in zip(parts, tests):
        train_counts = torch.bincount(y_train[p], minlength=10).double()
        test_counts = torch.bincount(y_test[t], minlength=10).double()
        assert set(torch.nonzero(test_counts).flatten().tolist()) <= set(torch.nonzero(train_counts).flatten().tolist())
        # each class's test samples are shared in proportion to the clients' training counts (within rounding)
        for c in torch.nonzero(train_counts).flatten().tolist():
            holders = sum(torch.bincount(y_train[q], minlength=10)[c].item() for q in parts)
            assert abs(test_counts[c].item() - 30 * train_counts[c].item() / holders) < 1.0
    assert [t.tolist() for t in tests] == [t.tolist() for t in client_test_split(y_train, parts, y_test, seed=3)]
    assert [t.tolist() for t in tests] != [t.tolist() for t in client_test_split(y_train, parts, y_test, seed=4)]


def test_client_test_split_by_domain_gives_the_whole_domain():
    dom_train = torch.tensor([0] * 5 + [1] * 7 + [2] * 3)
    dom_test = torch.tensor([2, 0, 1, 1, 0, 2, 2, 1])
    parts = [torch.arange(0, 5), torch.arange(5, 12), torch.arange(12, 15)]
    tests = client_test_split(dom_train, parts, dom_test, seed=0)
    assert [t.tolist() for t in tests] == [[1, 4], [2, 3, 7], [0, 5, 6]]


def tiny_label_skew_data(n_train=240, n_test=120):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_train + n_test, 1, 4, 4, generator=g)
    y = (x.flatten(1)[:, :4].argmax(1) + 2 * (x.flatten(1)[:, 4] > 0)).long() % 6
    return Dataset("tiny", Split(x[:n_train], y[:n_train]), Split(x[n_train:], y[n_train:]), 6)


def tiny_model():
    return Classifier(nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU()), 8, 6)


def make_run(method, evaluation, rounds=2, clients=3, lr=0.1):
    data = tiny_label_skew_data()
    parts = shards(data.train.y, clients=clients, shards_per_client=2, seed=0)
    spec = {"method": method, "seed": 0, "evaluation": evaluation,
            "training": {"rounds": rounds, "client_fraction": 1.0, "local_epochs": 1, "batch_size": 16, "lr": lr}}
    torch.manual_seed(0)
    ctx = RunContext(spec=spec, data=data, parts=parts, model=tiny_model(), make_model=tiny_model,
                     device=torch.device("cpu"), data_root="data")
    return FederatedRun(ctx, get_algorithm(method))


@pytest.mark.parametrize("weighting", ["clients", "samples"])
def test_per_client_evaluation_equals_a_direct_computation(weighting):
    run = make_run({"name": "fedper"}, {"per_client": True, "weighting": weighting})
    hist = run.train(progress=False)
    algo, data = run.algo, run.ctx.data
    tests = client_test_split(data.train.y, run.ctx.parts, data.test.y, seed=sub_seed(0, 0x7E57))
    correct, sizes = [], []
    for k, idx in enumerate(tests):
        model = tiny_model()
        model.load_state_dict(algo.client_state(run.final_state, k))
        model.eval()
        with torch.no_grad():
            correct.append((model(data.test.x[idx]).argmax(1) == data.test.y[idx]).sum().item())
        sizes.append(len(idx))
    per_client = [c / n for c, n in zip(correct, sizes)]
    expected = np.mean(per_client) if weighting == "clients" else sum(correct) / sum(sizes)
    assert hist.test_accuracy[-1] == pytest.approx(expected, abs=1e-12)
    assert hist.extra["client_accuracy"][-1] == pytest.approx(per_client, abs=1e-12)
    assert len(set(per_client)) > 1  # clients do differ, so the two weightings are distinguishable


def test_one_step_adaptation_is_one_sgd_step_on_a_training_batch():
    """`adapt_steps: 1`: FedAvg + update's evaluation equals the global model after one manual SGD step on the
    client's first batch, and it differs from the unadapted evaluation."""
    adapted = make_run({"name": "fedavg"}, {"per_client": True, "adapt_steps": 1, "adapt_lr": 0.5}, rounds=1)
    plain = make_run({"name": "fedavg"}, {"per_client": True}, rounds=1)
    h_adapted, h_plain = adapted.train(progress=False), plain.train(progress=False)
    assert torch.equal(torch.cat([v.flatten() for v in adapted.final_state.values()]),
                       torch.cat([v.flatten() for v in plain.final_state.values()]))  # same training
    assert h_adapted.test_accuracy[-1] != h_plain.test_accuracy[-1]
    k = 1
    gen = torch.Generator().manual_seed(sub_seed(0, 0, k, 0xADA))  # evaluation after the first round
    x, y = next(adapted.client_batches(k, 1, gen))
    model = tiny_model()
    model.load_state_dict(adapted.final_state)
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads):
            p.sub_(0.5 * g)
        idx = adapted.client_tests[k]
        acc = (model(adapted.x_test[idx]).argmax(1) == adapted.y_test[idx]).double().mean().item()
    assert h_adapted.extra["client_accuracy"][-1][k] == pytest.approx(acc, abs=1e-12)


# --- FedPer and LG-FedAvg: which entries stay, which are averaged ---------------------------------------------------
def recorder(cls, **kw):
    class Recorder(cls):
        def setup(self, ctx):
            super().setup(ctx)
            self.ends, self.begins, self.globals = [], [], []

        def begin_client(self, model, global_state, client):
            super().begin_client(model, global_state, client)
            self.begins.append((client, copy.deepcopy(model.state_dict())))

        def end_client(self, model, global_state, client, steps):
            super().end_client(model, global_state, client, steps)
            self.ends.append((client, copy.deepcopy(model.state_dict())))

        def server_update(self, global_state, client_states, weights, round_index):
            new = super().server_update(global_state, client_states, weights, round_index)
            self.globals.append(copy.deepcopy(new))
            return new
    return Recorder(**kw)


@pytest.mark.parametrize("cls,kw,local", [
    (FedPer, {"personal_layers": 1}, {"head.weight", "head.bias"}),
    (FedPer, {"personal_layers": 2}, {"head.weight", "head.bias", "features.3.weight", "features.3.bias"}),
    (LGFedAvg, {"global_layers": 1}, {"features.1.weight", "features.1.bias", "features.3.weight", "features.3.bias"}),
])
def test_personal_entries_are_kept_and_the_rest_averaged(cls, kw, local):
    run = make_run({"name": "fedper"}, {"per_client": True})
    run.algo = algo = recorder(cls, **kw)
    run.train(progress=False)
    assert set(algo.local_keys) == local
    init = {k: v for k, v in tiny_model_state().items()}
    ends1, begins2 = dict(algo.ends[:3]), dict(algo.begins[3:6])
    avg = weighted_mean([ends1[k] for k in range(3)], [len(p) for p in run.ctx.parts])
    assert not torch.equal(ends1[0]["head.weight"], ends1[1]["head.weight"])
    for key in init:
        if key in local:  # never averaged: the server keeps its initial value, each client its own
            assert torch.equal(algo.globals[0][key], init[key])
            for k in range(3):
                assert torch.equal(begins2[k][key], ends1[k][key])
        else:  # averaged, sample-weighted, and sent to every client
            torch.testing.assert_close(algo.globals[0][key], avg[key], rtol=1e-6, atol=1e-7)
            for k in range(3):
                assert torch.equal(begins2[k][key], algo.globals[0][key])


def tiny_model_state():
    torch.manual_seed(0)
    return tiny_model().state_dict()


def test_last_layers_are_the_head_first():
    m = build_model("cnn1d", 1, 10, 40, hidden=[32])
    assert last_layers_keys(m, 1) == {"head.weight", "head.bias"}
    assert last_layers_keys(m, 2) == {"head.weight", "head.bias", "features.7.weight", "features.7.bias"}


# --- Per-FedAvg -----------------------------------------------------------------------------------------------------
def test_hessian_vector_product_equals_explicit_hessian_and_finite_differences():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 5, generator=g, dtype=torch.float64)
    A = a @ a.T + torch.eye(5, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64)
    w = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(5, generator=g, dtype=torch.float64)

    def f(w):  # a quadratic plus a cubic term, so the Hessian depends on w
        return 0.5 * w @ A @ w + b @ w + (w ** 3).sum() / 3

    hv = hessian_vector_product(f(w), [w], [v])[0]
    explicit = torch.autograd.functional.hessian(f, w.detach()) @ v
    analytic = (A + torch.diag(2 * w.detach())) @ v
    eps = 1e-5
    grad = lambda x: torch.autograd.grad(f(x), x)[0]  # noqa: E731
    fd = (grad((w.detach() + eps * v).requires_grad_()) - grad((w.detach() - eps * v).requires_grad_())) / (2 * eps)
    torch.testing.assert_close(hv, analytic, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(hv, explicit, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(hv, fd, rtol=1e-6, atol=1e-6)


class Quadratic(nn.Module):
    """f(w; x, y) = mean over the batch of 0.5 (x.w - y)^2: its gradient and Hessian are known in closed form."""
    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w.clone())


def quad_loss(model, x, y):
    return 0.5 * ((x @ model.w - y) ** 2).mean()


@pytest.mark.parametrize("hessian", [False, True])
def test_meta_step_matches_the_closed_form(hessian):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, generator=g, dtype=torch.float64)
    batches = [(torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64))
               for _ in range(3)]
    alpha, beta = 0.1, 0.05
    grad = lambda w, b: b[0].T @ (b[0] @ w - b[1]) / len(b[1])  # noqa: E731
    hess = lambda b: b[0].T @ b[0] / len(b[1])  # noqa: E731
    adapted = w - alpha * grad(w, batches[0])
    outer = grad(adapted, batches[1])
    direction = outer - alpha * hess(batches[2]) @ outer if hessian else outer
    model = Quadratic(w)
    meta_step(model, quad_loss, batches if hessian else batches[:2], alpha, beta, hessian)
    torch.testing.assert_close(model.w.detach(), w - beta * direction, rtol=1e-12, atol=1e-12)
    # FO and HF differ exactly by the second-order term beta * alpha * H g
    other = Quadratic(w)
    meta_step(other, quad_loss, batches, alpha, beta, not hessian)
    diff = (other.w - model.w).detach() * (-1 if hessian else 1)  # HF - FO
    torch.testing.assert_close(diff, beta * alpha * hess(batches[2]) @ outer, rtol=1e-10, atol=1e-12)


# --- pFedHN ---------------------------------------------------------------------------------------------------------
def test_hypernetwork_gradient_is_the_chain_rule_through_the_generated_weights():
    gen = torch.Generator().manual_seed(0)
    shapes = {"a.weight": (3, 2), "a.bias": (3,), "b.weight": (1, 3)}
    hn = HyperNetwork(clients=4, embed_dim=2, hidden=5, n_hidden=2, shapes=shapes, generator=gen)
    hn.params = [p.detach().double().requires_grad_(True) for p in hn.params]
    generated = hn.generate(2)
    delta = {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in shapes.items()}
    got = hypernetwork_gradient(generated, delta, hn.params)
    # independent: the full Jacobian d theta / d phi (one flat vector of generated weights), transposed, times delta
    flat_params = [p.detach() for p in hn.params]

    def theta(*ps):
        h = HyperNetwork.__new__(HyperNetwork)
        h.shapes, h.params = hn.shapes, list(ps)
        return torch.cat([v.flatten() for v in h.generate(2).values()])

    jac = torch.autograd.functional.jacobian(theta, tuple(flat_params))
    d = torch.cat([delta[k].flatten() for k in shapes])
    for g_got, j in zip(got, jac):
        torch.testing.assert_close(g_got, torch.tensordot(d, j, dims=1), rtol=1e-10, atol=1e-12)
    assert torch.count_nonzero(got[0][[0, 1, 3]]) == 0  # only client 2's embedding gets a gradient
    assert torch.count_nonzero(got[0][2]) > 0


def test_pfedhn_client_update_equals_sgd_on_the_hypernetwork_with_delta_as_gradient():
    run = make_run({"name": "pfedhn", "momentum": 0.0, "weight_decay": 0.0, "clip": 1e9, "hn_lr": 0.3},
                   {"per_client": True}, rounds=1)
    algo = run.algo
    algo.setup(run.ctx)
    before = [p.detach().clone() for p in algo.hnet.params]
    theta = {k: v.detach().clone() for k, v in algo.hnet.generate(1).items()}
    model = run.ctx.model
    algo.begin_client(model, {k: v.clone() for k, v in model.state_dict().items()}, 1)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in theta.items())
    with torch.no_grad():  # a stand-in for local training: any change of the weights
        for p in model.parameters():
            p.add_(0.01 * torch.ones_like(p))
    algo.end_client(model, model.state_dict(), 1, steps=1)
    # manual: phi' = phi - lr * J^T (theta - theta'), J by autograd of the generator at phi
    params = [p.detach().clone().requires_grad_(True) for p in before]
    h = HyperNetwork.__new__(HyperNetwork)
    h.shapes, h.params = algo.hnet.shapes, params
    out = h.generate(1)
    target = sum((out[k] * (-0.01 * torch.ones_like(out[k]))).sum() for k in out)  # <theta(phi), Delta>
    grads = torch.autograd.grad(target, params, allow_unused=True)
    for p_new, p_old, g in zip(algo.hnet.params, before, grads):
        torch.testing.assert_close(p_new.detach(), p_old - 0.3 * (torch.zeros_like(p_old) if g is None else g),
                                   rtol=1e-5, atol=1e-6)


def test_pfedhn_pc_keeps_the_head_on_the_client():
    run = make_run({"name": "pfedhn", "personal_classifier": True}, {"per_client": True}, rounds=2)
    run.train(progress=False)
    algo = run.algo
    assert set(algo.local_keys) == {"head.weight", "head.bias"}
    assert set(algo.hnet.shapes) == {"features.1.weight", "features.1.bias", "features.3.weight", "features.3.bias"}
    heads = [algo.local[k]["head.weight"] for k in range(3)]
    assert not torch.equal(heads[0], heads[1])
    assert algo.transmitted_keys(run.final_state) == list(algo.hnet.shapes)


# --- every method resumes bit-identically from a checkpoint ---------------------------------------------------------
METHODS = [{"name": "fedper", "personal_layers": 2}, {"name": "lgfedavg"}, {"name": "perfedavg", "variant": "fo"},
           {"name": "perfedavg", "variant": "hf"}, {"name": "pfedhn"}, {"name": "pfedhn", "personal_classifier": True},
           {"name": "pfedme", "K": 2}]


@pytest.mark.parametrize("method", METHODS, ids=lambda m: "-".join(str(v) for v in m.values()))
def test_resume_after_a_crash_is_bit_identical(tmp_path, monkeypatch, method):
    spec = {"seed": 1, "dataset": {"name": "mnist1d", "train_limit": 400, "test_limit": 200},
            "partition": {"scheme": "shards", "clients": 4, "shards_per_client": 2},
            "model": {"name": "cnn1d", "channels": [4, 4], "hidden": [8]}, "method": method,
            "training": {"rounds": 4, "client_fraction": 1.0, "local_epochs": 1, "batch_size": 32, "lr": 0.05,
                         "momentum": 0.5},
            "evaluation": {"per_client": True, "adapt_steps": 1, "adapt_lr": 0.05}}
    ref = execute(spec, progress=False)
    ckpt = tmp_path / "run.pt"
    cls = type(get_algorithm(method))
    original = cls.server_update

    def crash(self, global_state, states, weights, round_index):
        if round_index == 2:
            raise KeyboardInterrupt("killed")
        return original(self, global_state, states, weights, round_index)
    monkeypatch.setattr(cls, "server_update", crash)
    with pytest.raises(KeyboardInterrupt):
        execute(spec, progress=False, checkpoint=ckpt)
    monkeypatch.setattr(cls, "server_update", original)
    resumed = execute(spec, progress=False, checkpoint=ckpt)
    assert resumed["resumed_at_rounds"] == [2]
    assert repeatable_part(resumed) == repeatable_part(ref)


# --- the ceiling of a personalised table: the pooled model, each client's predictions among its own classes ----------
class Lookup(nn.Module):
    """A 'model' with known logits: sample i (its input is the number i) gets row i of `table`."""

    def __init__(self, table):
        super().__init__()
        self.register_buffer("table", torch.tensor(table, dtype=torch.float32))

    def forward(self, x):
        return self.table[x[:, 0].long()]


# test labels and logits, 4 classes; client 0 trains on classes {0, 1}, client 1 on {2, 3}. Unrestricted, only the
# samples 2, 6 and 8 are right; restricted to each client's classes, 0, 2, 3 (client 0) and 4, 6, 8, 9 (client 1).
LOOKUP_Y = [0, 0, 1, 1, 2, 2, 3, 3, 3, 3]
LOOKUP_LOGITS = [[1, 0, 5, 0], [0, 2, 0, 0], [0, 3, 0, 0], [0, 1, 0, 4], [9, 0, 1, 0],
                 [0, 0, 1, 2], [0, 0, 0, 1], [5, 0, 1, 0], [0, 0, 2, 3], [0, 7, 0, 1]]


def lookup_run(evaluation):
    y_train = torch.tensor([0, 1, 1, 0, 2, 3, 3, 2, 2])
    data = Dataset("lookup", Split(torch.zeros(9, 1), y_train),
                   Split(torch.arange(10, dtype=torch.float32)[:, None], torch.tensor(LOOKUP_Y)), 4)
    parts = [torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5, 6, 7, 8])]
    spec = {"method": {"name": "fedavg"}, "seed": 0, "evaluation": evaluation,
            "training": {"rounds": 1, "client_fraction": 1.0, "local_epochs": 1, "batch_size": 4, "lr": 0.1}}
    model = Lookup(LOOKUP_LOGITS)
    ctx = RunContext(spec=spec, data=data, parts=parts, model=model, make_model=lambda: Lookup(LOOKUP_LOGITS),
                     device=torch.device("cpu"), data_root="data")
    return FederatedRun(ctx, get_algorithm(spec["method"])), model


@pytest.mark.parametrize("weighting,expected", [("samples", 7 / 10), ("clients", (3 / 4 + 4 / 6) / 2)])
def test_restricting_to_client_labels_equals_a_direct_computation(weighting, expected):
    from common.fl.engine import evaluate_clients
    run, model = lookup_run({"per_client": True, "weighting": weighting, "restrict_to_client_labels": True})
    assert [t.tolist() for t in run.client_tests] == [[0, 1, 2, 3], [4, 5, 6, 7, 8, 9]]
    out = evaluate_clients(run, lambda k: model)
    assert out["test_accuracy"] == pytest.approx(expected, abs=1e-12)
    assert out["client_accuracy"] == pytest.approx([3 / 4, 4 / 6], abs=1e-12)
    # the loss: cross-entropy of the softmax over the client's own classes
    logits, y = torch.tensor(LOOKUP_LOGITS, dtype=torch.float32), torch.tensor(LOOKUP_Y)
    losses = [F.cross_entropy(logits[:4, :2], y[:4], reduction="sum").item() / 4,
              F.cross_entropy(logits[4:, 2:], y[4:] - 2, reduction="sum").item() / 6]
    want = np.mean(losses) if weighting == "clients" else (4 * losses[0] + 6 * losses[1]) / 10
    assert out["test_loss"] == pytest.approx(want, rel=1e-6)
    plain, _ = lookup_run({"per_client": True, "weighting": weighting})
    unrestricted = 3 / 10 if weighting == "samples" else (1 / 4 + 2 / 6) / 2
    assert evaluate_clients(plain, lambda k: model)["test_accuracy"] == pytest.approx(unrestricted, abs=1e-12)


def test_restricting_to_client_labels_needs_per_client_evaluation():
    with pytest.raises(SuiteError, match="needs per-client evaluation"):
        lookup_run({"restrict_to_client_labels": True})


def test_personalised_ceiling_trains_the_pooled_model_and_evaluates_it_on_each_clients_split():
    """The centralised run that keeps the partition trains exactly the model of the pooled one-client run, and is
    evaluated on the partition's clients, each among its own classes (checked against a direct computation)."""
    evaluation = {"per_client": True, "weighting": "samples", "restrict_to_client_labels": True}
    ceiling = make_run({"name": "centralised"}, evaluation, rounds=2)
    original = list(ceiling.ctx.parts)
    hist = ceiling.train(progress=False)
    data = ceiling.ctx.data
    pooled = make_run({"name": "centralised"}, {}, rounds=2)
    pooled.ctx.parts[:] = [torch.arange(len(data.train.y))]  # the plain ceiling: one client holding everything
    pooled.train(progress=False)
    for key, value in ceiling.final_state.items():
        assert torch.equal(value, pooled.final_state[key])
    model = tiny_model()
    model.load_state_dict(ceiling.final_state)
    model.eval()
    tests = client_test_split(data.train.y, original, data.test.y, seed=sub_seed(0, 0x7E57))
    correct, total = 0, 0
    with torch.no_grad():
        for part, idx in zip(original, tests):
            classes = sorted(set(data.train.y[part].tolist()))
            pred = torch.tensor(classes)[model(data.test.x[idx])[:, classes].argmax(1)]
            correct += (pred == data.test.y[idx]).sum().item()
            total += len(idx)
    assert total == len(data.test.y) and len(hist.extra["client_accuracy"][-1]) == 3
    assert hist.test_accuracy[-1] == pytest.approx(correct / total, abs=1e-12)


def test_personalised_tables_get_one_shared_ceiling_per_partition():
    from common.experiments import load_paper, table_ceilings
    pfedhn = table_ceilings(load_paper("pfedhn"), "table1", "mini")
    assert [c.where for c in pfedhn] == ["10 clients × 2 shards", "50 clients × 2 shards"]
    for c, clients in zip(pfedhn, (10, 50)):
        spec = c.specs[0]
        assert spec["method"] == {"name": "centralised"} and spec["training"]["rounds"] == 30
        assert spec["partition"] == {"scheme": "shards", "clients": clients, "shards_per_client": 2}
        assert spec["evaluation"] == {"per_client": True, "weighting": "samples", "restrict_to_client_labels": True}
    # the same ceiling runs serve the three reports where their partitions coincide
    (two, *_), = [table_ceilings(load_paper("fedper"), "skew", "mini")]
    perfedavg = table_ceilings(load_paper("perfedavg"), "clients", "mini")
    assert two.where == "10 clients × 2 shards" and two.run_ids == pfedhn[0].run_ids == perfedavg[0].run_ids
    assert perfedavg[1].run_ids == pfedhn[1].run_ids


# --- pFedMe ---------------------------------------------------------------------------------------------------------
def test_moreau_step_is_gradient_descent_on_the_envelope_objective_and_converges_to_its_minimiser():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    anchor = [p.detach().clone() + 0.3 for p in model.parameters()]
    start = [p.detach().clone() for p in model.parameters()]
    loss_fn = lambda m, a, b: F.cross_entropy(m(a), b)  # noqa: E731
    moreau_step(model, loss_fn, x, y, anchor, personal_lr=0.1, lam=2.0, mu=0.01, steps=1)
    probe = nn.Linear(3, 2)
    with torch.no_grad():
        for p, s in zip(probe.parameters(), start):
            p.copy_(s)
    grads = torch.autograd.grad(loss_fn(probe, x, y), list(probe.parameters()))
    for p, s, g, w in zip(model.parameters(), start, grads, anchor):
        torch.testing.assert_close(p, s - 0.1 * (g + 2.0 * (s - w) + 0.01 * s))
    # many steps: θ is the minimiser of f(θ) + λ/2 ||θ - w||^2 + μ/2 ||θ||^2 (its gradient vanishes)
    moreau_step(model, loss_fn, x, y, anchor, personal_lr=0.1, lam=2.0, mu=0.01, steps=3000)
    grads = torch.autograd.grad(loss_fn(model, x, y), list(model.parameters()))
    residual = max((g + 2.0 * (p - w) + 0.01 * p).abs().max().item()
                   for p, g, w in zip(model.parameters(), grads, anchor))
    assert residual < 1e-5


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_pfedme_round_equals_a_direct_computation(beta):
    """One round of pFedMe: per client and batch, K Moreau steps on θ from where it is, then w <- w - lr λ (w - θ);
    the server mixes the sample-weighted mean of the w_i into the global model with β; each client is evaluated with
    its θ_i."""
    method = {"name": "pfedme", "lam": 3.0, "K": 2, "personal_lr": 0.05, "mu": 0.001, "beta": beta}
    run = make_run(method, {"per_client": True}, rounds=1, lr=0.1)
    init = {k: v.clone() for k, v in run.ctx.model.state_dict().items()}
    hist = run.train(progress=False)
    thetas, ws = [], []
    for k in range(3):
        model = tiny_model()
        model.load_state_dict(init)
        w = [p.detach().clone() for p in model.parameters()]
        gen = torch.Generator().manual_seed(sub_seed(0, 0, k))
        for x, y in run.client_batches(k, 1, gen):
            for _ in range(2):
                grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
                with torch.no_grad():
                    for p, g, a in zip(model.parameters(), grads, w):
                        p.sub_(0.05 * (g + 3.0 * (p - a) + 0.001 * p))
            with torch.no_grad():
                for a, p in zip(w, model.parameters()):
                    a.sub_(0.1 * 3.0 * (a - p))
        thetas.append({k2: v.detach().clone() for k2, v in model.state_dict().items()})
        ws.append(dict(zip([n for n, _ in model.named_parameters()], w)))
    sizes = [len(p) for p in run.ctx.parts]
    avg = weighted_mean(ws, sizes)
    for name, value in run.final_state.items():
        torch.testing.assert_close(value, (1 - beta) * init[name] + beta * avg[name], rtol=1e-5, atol=1e-6)
    for k in range(3):
        for name, value in thetas[k].items():
            torch.testing.assert_close(run.algo.personal[k][name], value, rtol=1e-5, atol=1e-6)
    tests = client_test_split(run.ctx.data.train.y, run.ctx.parts, run.ctx.data.test.y, seed=sub_seed(0, 0x7E57))
    accs = []
    for k, idx in enumerate(tests):
        model = tiny_model()
        model.load_state_dict(thetas[k])
        model.eval()
        with torch.no_grad():
            accs.append((model(run.ctx.data.test.x[idx]).argmax(1) == run.ctx.data.test.y[idx]).double().mean().item())
    assert hist.extra["client_accuracy"][-1] == pytest.approx(accs, abs=1e-12)
