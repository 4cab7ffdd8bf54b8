"""FedDF: the distillation loss, the ensemble teacher, and the server-side fusion step."""
import numpy as np
import torch
from torch import nn

from common.distill import ensemble_probs, kd_loss, predict_logits
from common.fl import RunContext, get_algorithm
from common.fl.engine import FederatedRun, History, clone_state
from common.models import Classifier
from papers.feddf.method import FedDF, distill, mean_kd_loss


def small_model():
    return Classifier(nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU()), 12, 4)


def test_kd_loss_matches_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    for temp in (1.0, 3.0):
        pt = np.exp(t.numpy() / temp) / np.exp(t.numpy() / temp).sum(1, keepdims=True)
        ps = np.exp(s.numpy() / temp) / np.exp(s.numpy() / temp).sum(1, keepdims=True)
        expected = (pt * (np.log(pt) - np.log(ps))).sum(1).mean() * temp ** 2
        assert abs(kd_loss(s, torch.softmax(t / temp, 1), temp).item() - expected) < 1e-5


def test_ensemble_probs_logits_and_probs():
    g = torch.Generator().manual_seed(1)
    logits = [torch.randn(6, 4, generator=g) for _ in range(3)]
    mean_logits = np.mean([l.numpy() for l in logits], axis=0)
    expected_logits = np.exp(mean_logits) / np.exp(mean_logits).sum(1, keepdims=True)
    expected_probs = np.mean([np.exp(l.numpy()) / np.exp(l.numpy()).sum(1, keepdims=True) for l in logits], axis=0)
    np.testing.assert_allclose(ensemble_probs(logits, average="logits").numpy(), expected_logits, rtol=1e-5)
    np.testing.assert_allclose(ensemble_probs(logits, average="probs").numpy(), expected_probs, rtol=1e-5)
    assert not np.allclose(expected_logits, expected_probs)


def test_distillation_lowers_kl_to_ensemble_on_held_out_data():
    torch.manual_seed(0)
    x = torch.randn(600, 1, 4, 4)
    teachers = [small_model() for _ in range(3)]
    probs = ensemble_probs([predict_logits(t, x) for t in teachers])
    student = small_model()
    x_tr, x_val, p_tr, p_val = x[:480], x[480:], probs[:480], probs[480:]
    before = mean_kd_loss(student, x_val, p_val, 1.0)
    info = distill(student, x_tr, p_tr, x_val, p_val, steps=150, batch_size=32, lr=1e-2, patience=150,
                   eval_every=10, temperature=1.0, generator=torch.Generator().manual_seed(0))
    after = mean_kd_loss(student, x_val, p_val, 1.0)  # measured independently of distill's own bookkeeping
    assert info["val_kl_before"] == before
    assert after < 0.5 * before
    assert abs(after - info["val_kl_after"]) < 1e-6


def test_early_stopping_keeps_the_best_model():
    torch.manual_seed(0)
    x = torch.randn(300, 1, 4, 4)
    probs = ensemble_probs([predict_logits(small_model(), x)])
    student = small_model()
    before = mean_kd_loss(student, x[200:], probs[200:], 1.0)
    # A huge learning rate makes every step worse: the best model is the initial one, returned unchanged.
    info = distill(student, x[:200], probs[:200], x[200:], probs[200:], steps=100, batch_size=50, lr=50.0,
                   patience=20, eval_every=5, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert info["steps"] < 100
    assert mean_kd_loss(student, x[200:], probs[200:], 1.0) <= before


def test_feddf_fusion_starts_from_fedavg_and_moves_towards_the_ensemble(tmp_path):
    torch.manual_seed(0)
    from common.data import load_dataset
    data = load_dataset("mnist5k", train_limit=200, test_limit=100)
    from common.models import build_model

    def make():
        return build_model("cnn", 1, 10, 28, norm="bn")
    spec = {"seed": 0, "method": {"name": "feddf"},
            "training": {"rounds": 1, "client_fraction": 1.0, "local_epochs": 5, "batch_size": 32, "lr": 0.1}}
    # Two clients that disagree: each holds half of the classes.
    label_split = [torch.nonzero(data.train.y < 5).flatten(), torch.nonzero(data.train.y >= 5).flatten()]
    ctx = RunContext(spec, data, label_split, make(), make, torch.device("cpu"), "data", history=History())
    algo = get_algorithm({"name": "feddf", "unlabeled": "digits28", "steps": 30, "batch_size": 64, "lr": 1e-3,
                          "patience": 30, "eval_every": 10, "unlabeled_limit": 400})
    assert isinstance(algo, FedDF)
    algo.setup(ctx)
    global_state = clone_state(ctx.model)
    run, clients = FederatedRun(ctx, algo), []
    for k in range(2):
        ctx.model.load_state_dict(global_state)
        run.local_train(k, 0)
        clients.append(clone_state(ctx.model))
    ctx.model.load_state_dict(global_state)
    fused = algo.server_update(global_state, clients, [1, 1], 0)
    t_train, t_val = algo.teacher(clients)
    avg_model = make()
    from common.fl.algorithms import weighted_mean
    avg_model.load_state_dict(weighted_mean(clients, [1, 1]))
    fused_model = make()
    fused_model.load_state_dict(fused)
    # Averaging two disagreeing models loses the ensemble's predictions; distillation recovers part of them.
    assert mean_kd_loss(fused_model, algo.x_val, t_val, 1.0) < 0.9 * mean_kd_loss(avg_model, algo.x_val, t_val, 1.0)
    assert ctx.history.extra["distill_steps"][0] > 0
