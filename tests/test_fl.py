"""The federated engine: aggregation maths, algorithm equivalences, determinism."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from common.data import Dataset, Split
from common.fl import FederatedRun, RunContext, get_algorithm
from common.fl.algorithms import weighted_mean
from common.fl.engine import sub_seed
from common.models import Classifier


def tiny_model():
    feats = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU())
    return Classifier(feats, 8, 3)


def tiny_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(240, 1, 4, 4, generator=g)
    y = (x.flatten(1)[:, :3].argmax(1))  # learnable labels
    return Dataset("tiny", Split(x[:180], y[:180]), Split(x[180:], y[180:]), 3)


def make_ctx(method, seed=0, rounds=2, fraction=0.5, epochs=2):
    data = tiny_data()
    parts = list(torch.arange(180).chunk(6))
    spec = {"method": method, "seed": seed,
            "training": {"rounds": rounds, "client_fraction": fraction, "local_epochs": epochs, "batch_size": 16,
                         "lr": 0.1}}
    torch.manual_seed(seed)
    return RunContext(spec=spec, data=data, parts=parts, model=tiny_model(), make_model=tiny_model,
                      device=torch.device("cpu"), data_root="data")


def run(method, **kw):
    ctx = make_ctx(method, **kw)
    hist = FederatedRun(ctx, get_algorithm(method)).train(progress=False)
    return hist, {k: v.clone() for k, v in ctx.model.state_dict().items()}


def random_states(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = tiny_model()
    return [{k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone())
             for k, v in model.state_dict().items()} for _ in range(n)]


def test_weighted_mean_matches_numpy():
    states, weights = random_states(3), [10, 30, 60]
    out = weighted_mean(states, weights)
    for key in states[0]:
        if not states[0][key].is_floating_point():
            continue
        expected = sum(w * s[key].numpy().astype(np.float64) for s, w in zip(states, weights)) / sum(weights)
        np.testing.assert_allclose(out[key].numpy(), expected, rtol=1e-6, atol=1e-7)


def test_fedavg_server_update_is_sample_weighted_mean():
    ctx = make_ctx({"name": "fedavg"})
    algo = get_algorithm({"name": "fedavg"})
    algo.setup(ctx)
    global_state = ctx.model.state_dict()
    clients, weights = random_states(4, seed=1), [5, 1, 2, 8]
    new = algo.server_update(global_state, clients, weights, 0)
    for key, v in new.items():
        if v.is_floating_point():
            expected = sum(w * c[key].double() for c, w in zip(clients, weights)) / sum(weights)
            torch.testing.assert_close(v.double(), expected, rtol=1e-5, atol=1e-6)


def test_fedavgm_momentum_against_formula():
    beta, lr = 0.5, 0.7
    ctx = make_ctx({"name": "fedavgm", "beta": beta, "server_lr": lr})
    algo = get_algorithm({"name": "fedavgm", "beta": beta, "server_lr": lr})
    algo.setup(ctx)
    names = [n for n, _ in ctx.model.named_parameters()]
    x = {n: ctx.model.state_dict()[n].double().clone() for n in names}
    state = ctx.model.state_dict()
    v = {n: torch.zeros_like(x[n]) for n in names}
    for r in range(3):
        clients, weights = random_states(2, seed=10 + r), [3, 1]
        state = algo.server_update(state, clients, weights, r)
        for n in names:
            avg = (3 * clients[0][n].double() + clients[1][n].double()) / 4
            v[n] = beta * v[n] + (x[n] - avg)
            x[n] = x[n] - lr * v[n]
            torch.testing.assert_close(state[n].double(), x[n], rtol=1e-5, atol=1e-5)


def test_fedprox_gradient_adds_proximal_term():
    mu = 0.3
    algo = get_algorithm({"name": "fedprox", "mu": mu})
    model = tiny_model()
    data = tiny_data()
    algo.begin_client(model, model.state_dict(), 0)
    with torch.no_grad():  # move away from the anchor so the proximal term is non-zero
        for p in model.parameters():
            p.add_(0.1)
    x, y = data.train.x[:16], data.train.y[:16]
    model.train()
    ce = nn.functional.cross_entropy(model(x), y)
    g_ce = torch.autograd.grad(ce, list(model.parameters()))
    g_prox = torch.autograd.grad(algo.local_loss(model, x, y), list(model.parameters()))
    for gc, gp, p, a in zip(g_ce, g_prox, model.parameters(), algo.anchor):
        torch.testing.assert_close(gp - gc, mu * (p.detach() - a), rtol=1e-4, atol=1e-6)


def test_fedprox_mu0_reproduces_fedavg_exactly():
    h_avg, s_avg = run({"name": "fedavg"})
    h_prox, s_prox = run({"name": "fedprox", "mu": 0.0})
    assert h_avg.test_accuracy == h_prox.test_accuracy and h_avg.train_loss == h_prox.train_loss
    assert all(torch.equal(s_avg[k], s_prox[k]) for k in s_avg)


def test_fedavgm_beta0_reproduces_fedavg_exactly():
    h_avg, s_avg = run({"name": "fedavg"}, rounds=3)
    h_m, s_m = run({"name": "fedavgm", "beta": 0.0}, rounds=3)
    assert h_avg.train_loss == h_m.train_loss
    assert all(torch.equal(s_avg[k], s_m[k]) for k in s_avg)


def test_fedavgm_with_momentum_differs_from_fedavg():
    _, s_avg = run({"name": "fedavg"}, rounds=3)
    _, s_m = run({"name": "fedavgm", "beta": 0.9}, rounds=3)
    assert not all(torch.equal(s_avg[k], s_m[k]) for k in s_avg)


def test_run_is_bit_repeatable_and_seed_dependent():
    h1, s1 = run({"name": "fedavg"}, seed=3)
    h2, s2 = run({"name": "fedavg"}, seed=3)
    h3, s3 = run({"name": "fedavg"}, seed=4)
    assert h1.train_loss == h2.train_loss and all(torch.equal(s1[k], s2[k]) for k in s1)
    assert h1.train_loss != h3.train_loss


def test_training_improves_accuracy():
    hist, _ = run({"name": "fedavg"}, rounds=8, fraction=1.0, epochs=3)
    assert hist.test_accuracy[-1] > 0.6 > 1 / 3 + 0.1


def plain_model():
    """Without BatchNorm: a bias just before BatchNorm has no gradient, and Adam turns its rounding noise into steps."""
    torch.manual_seed(0)
    return Classifier(nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU()), 8, 3)


def kept_adamw_ctx(keep=True, rounds=3):
    """Centralised AdamW training on the tiny data, one epoch per round."""
    ctx = make_ctx({"name": "centralised"}, rounds=rounds, fraction=1.0, epochs=1)
    ctx.spec["training"].update(optimizer="adamw", lr=0.01, keep_optimizer=keep)
    ctx.model = plain_model()
    return ctx


def test_kept_optimizer_is_one_adamw_over_all_rounds():
    ctx = kept_adamw_ctx()
    FederatedRun(ctx, get_algorithm({"name": "centralised"})).train(progress=False)
    # independently: one AdamW over three epochs, each epoch's batch order the engine's for (seed, round, client 0)
    model = plain_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.0)  # the engine's default decay
    data = tiny_data()
    model.train()
    for r in range(3):
        perm = torch.randperm(180, generator=torch.Generator().manual_seed(sub_seed(0, r, 0)))
        for i in range(0, 180, 16):
            b = perm[i:i + 16]
            opt.zero_grad()
            nn.functional.cross_entropy(model(data.train.x[b]), data.train.y[b]).backward()
            opt.step()
    assert all(torch.allclose(v, model.state_dict()[k], atol=1e-6) for k, v in ctx.model.state_dict().items())

    restarted = kept_adamw_ctx(keep=False)
    FederatedRun(restarted, get_algorithm({"name": "centralised"})).train(progress=False)
    assert not torch.allclose(restarted.model.head.weight, ctx.model.head.weight, atol=1e-4)


def test_kept_optimizer_state_resumes_from_a_checkpoint_bit_identical(tmp_path):
    ref = kept_adamw_ctx(rounds=4)
    FederatedRun(ref, get_algorithm({"name": "centralised"})).train(progress=False)

    class Interrupted(Exception):
        pass

    ckpt = tmp_path / "run.pt"
    ctx = kept_adamw_ctx(rounds=4)
    interrupted = FederatedRun(ctx, get_algorithm({"name": "centralised"}))
    evaluate_round = type(interrupted.algo).evaluate

    def evaluate_then_crash(algo, run, state):
        if len(ctx.history.rounds) == 2:
            raise Interrupted  # after two rounds and their checkpoints
        return evaluate_round(algo, run, state)

    with pytest.MonkeyPatch.context() as mp, pytest.raises(Interrupted):
        mp.setattr(type(interrupted.algo), "evaluate", evaluate_then_crash)
        interrupted.train(progress=False, checkpoint=ckpt)
    assert torch.load(ckpt, weights_only=True)["next_round"] == 2

    resumed = kept_adamw_ctx(rounds=4)
    hist = FederatedRun(resumed, get_algorithm({"name": "centralised"})).train(progress=False, checkpoint=ckpt)
    assert hist.resumed_at == [2]
    assert all(torch.equal(v, resumed.model.state_dict()[k]) for k, v in ref.model.state_dict().items())


def test_client_sampling():
    ctx = make_ctx({"name": "fedavg"}, fraction=0.5)
    fr = FederatedRun(ctx, get_algorithm({"name": "fedavg"}))
    picks = [fr.sample_clients(r) for r in range(20)]
    assert all(len(p) == 3 and p == sorted(set(p)) for p in picks)
    assert picks == [fr.sample_clients(r) for r in range(20)]
    assert len({tuple(p) for p in picks}) > 1


def test_divergence_is_recorded_not_hidden():
    ctx = make_ctx({"name": "fedavg"}, rounds=3)
    ctx.spec["training"]["lr"] = 1e30
    hist = FederatedRun(ctx, get_algorithm({"name": "fedavg"})).train(progress=False)
    assert hist.status == "diverged"


def test_unknown_method_and_parameter():
    from common.errors import SuiteError
    with pytest.raises(SuiteError, match="unknown method 'fedfoo'"):
        get_algorithm({"name": "fedfoo"})
    with pytest.raises(SuiteError, match="no parameter"):
        get_algorithm({"name": "fedprox", "muu": 1})
