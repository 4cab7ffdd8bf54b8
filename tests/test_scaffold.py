"""SCAFFOLD's option-II control update under the engine's momentum and lr decay: against a hand computation, and
the divergence the plain K * lr divisor causes on label-disjoint clients."""
import numpy as np
import pytest
import torch
from torch import nn

import common.fl.scaffold as scaffold
from common.data import Dataset, Split
from common.fl import FederatedRun, RunContext, get_algorithm


def blobs(seed=0, n_per=60, d=8, classes=4):
    """Gaussian blobs, one per class, shuffled; 3/4 train, 1/4 test."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, d, generator=g) * 2
    y = torch.arange(classes).repeat_interleave(n_per)
    x = centers[y] + torch.randn(len(y), d, generator=g)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    n = len(y) * 3 // 4
    return Dataset("blobs", Split(x[:n], y[:n]), Split(x[n:], y[n:]), classes)


def make_run(model_fn, parts, data, **training):
    spec = {"method": {"name": "scaffold"}, "seed": 0,
            "training": {"client_fraction": 1.0, "momentum": 0.9, **training}}
    torch.manual_seed(0)
    ctx = RunContext(spec=spec, data=data, parts=parts, model=model_fn(), make_model=model_fn,
                     device=torch.device("cpu"), data_root="data")
    return FederatedRun(ctx, get_algorithm(spec["method"]))


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9])
def test_effective_steps_is_the_distance_momentum_sgd_moves_per_unit_gradient(momentum):
    for k in (1, 2, 7, 80):
        buf, moved = 0.0, 0.0
        for step in range(k):  # heavy-ball SGD on a constant gradient 1 with lr 1
            buf = 1.0 if step == 0 else momentum * buf + 1.0
            moved += buf
        assert scaffold.effective_steps(k, momentum) == pytest.approx(moved, rel=1e-12)
    assert scaffold.effective_steps(5, 0.0) == 5


def softmax_ce_grad(W, b, x, y):
    """Gradient of the mean cross-entropy of the linear model x @ W.T + b (plain numpy)."""
    z = x @ W.T + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(y)), y] -= 1
    p /= len(y)
    return p.T @ x, p.sum(0)


def test_control_update_matches_a_hand_computation_with_momentum_and_lr_decay():
    """A linear softmax model on 3 clients, full-batch local steps (so the batch order plays no role), momentum 0.9
    and lr decay 0.5: three rounds written out in numpy, with K_eff summed step by step and the round's lr."""
    data = blobs(classes=3, n_per=20)
    parts = [torch.arange(15 * k, 15 * k + 15) for k in range(3)]
    lr, decay, rho, epochs, rounds = 0.2, 0.5, 0.9, 6, 3
    run = make_run(lambda: nn.Linear(8, 3), parts, data, rounds=rounds, local_epochs=epochs, batch_size=15,
                   lr=lr, lr_decay=decay, momentum=rho)
    algo, seen = run.algo, []
    server_update = algo.server_update

    def record(*args):  # each round's client variates, before the server update
        seen.append({k: [t.double().numpy().copy() for t in ci] for k, ci in algo.c_clients.items()})
        return server_update(*args)

    algo.server_update = record
    W0, b0 = (p.detach().double().numpy().copy() for p in run.ctx.model.parameters())
    run.train(progress=False)

    X, Y = data.train.x.double().numpy(), data.train.y.numpy()
    W, b = W0, b0
    c = [np.zeros_like(W), np.zeros_like(b)]
    c_i = {k: [np.zeros_like(W), np.zeros_like(b)] for k in range(3)}
    for r in range(rounds):
        lr_r = lr * decay ** r
        k_eff = sum(sum(rho ** j for j in range(k + 1)) for k in range(epochs))
        new_states, deltas = [], []
        for k, idx in enumerate(parts):
            x, y = X[idx.numpy()], Y[idx.numpy()]
            w, bb = W.copy(), b.copy()
            buf = None
            for _ in range(epochs):
                gw, gb = softmax_ce_grad(w, bb, x, y)
                g = [gw + c[0] - c_i[k][0], gb + c[1] - c_i[k][1]]
                buf = g if buf is None else [rho * m + gi for m, gi in zip(buf, g)]
                w, bb = w - lr_r * buf[0], bb - lr_r * buf[1]
            new = [ci - cg + (x0 - y0) / (k_eff * lr_r) for ci, cg, x0, y0 in zip(c_i[k], c, (W, b), (w, bb))]
            deltas.append([n - o for n, o in zip(new, c_i[k])])
            c_i[k] = new
            new_states.append((w, bb))
            for ours, expected in zip(seen[r][k], new):
                np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5, err_msg=f"round {r}, client {k}")
        W = np.mean([s[0] for s in new_states], 0)
        b = np.mean([s[1] for s in new_states], 0)
        c = [cg + sum(d[j] for d in deltas) / 3 for j, cg in enumerate(c)]
    for ours, expected in zip(algo.c, c):
        np.testing.assert_allclose(ours.double().numpy(), expected, rtol=1e-4, atol=1e-5)
    assert run.ctx.round_lr == pytest.approx(lr * decay ** (rounds - 1))


def max_client_variate_per_round(plain_divisor: bool, monkeypatch) -> tuple[str, list[float]]:
    """4 clients holding one class each of 4 blobs, a small MLP, momentum 0.9, 8 rounds of 5 local epochs;
    max |c_i| over all clients after each round. `plain_divisor`: the old K * lr divisor."""
    data = blobs()
    parts = [torch.nonzero(data.train.y == k).flatten() for k in range(4)]
    run = make_run(lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), parts, data,
                   rounds=8, local_epochs=5, batch_size=15, lr=0.05)
    algo, maxes = run.algo, []
    server_update = algo.server_update

    def record(*args):
        maxes.append(max(float(t.abs().max()) for ci in algo.c_clients.values() for t in ci))
        return server_update(*args)

    algo.server_update = record
    with monkeypatch.context() as m:
        if plain_divisor:
            m.setattr(scaffold, "effective_steps", lambda steps, momentum: float(steps))
        hist = run.train(progress=False)
    return hist.status, maxes


def test_plain_divisor_blows_up_the_control_variates_under_momentum_and_k_eff_keeps_them_bounded(monkeypatch):
    status, old = max_client_variate_per_round(True, monkeypatch)
    # K * lr underestimates the distance momentum SGD moves: |c_i| grows several-fold every round
    assert status == "diverged" or (old[-1] > 1000 and all(b > 2 * a for a, b in zip(old[2:], old[3:]))), old
    status, new = max_client_variate_per_round(False, monkeypatch)
    assert status == "completed" and max(new) < 2.0, new
