"""FedGen (papers/fedgen/method.py): the generator's objective and the clients' regulariser against direct numpy
computations on hand-made heads, label counts and latents; the algorithm's hooks; the model, the metric and the
paper-scale loaders (EMNIST letters, CelebA smiling) on small files written here."""
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from common.data import load_dataset, missing_files
from common.errors import DatasetMissing
from common.experiments import load_paper, resolve_cell
from common.models import build_model
from common.report.metrics import best_accuracy
from papers.fedgen import method as fg
from tests.test_fedopt_data import write_idx


# --- independent formulas (numpy, float64, loops) -----------------------------------------------------------------
def np_log_softmax(v):
    v = v - v.max()
    return v - math.log(np.exp(v).sum())


def np_diversity(eps, z):
    n = len(z)
    total = 0.0
    for i in range(n):
        for j in range(n):
            total += np.mean((eps[i] - eps[j]) ** 2) * np.mean(np.abs(z[i] - z[j]))
    return math.exp(-total / (n * n))


def np_teacher(W, b, z, y, counts):
    """sum over clients k of the mean over samples of w[y_i, k] * CE(W_k z_i + b_k, y_i), w from counts (K, C)."""
    K = len(W)
    total = 0.0
    for k in range(K):
        s = 0.0
        for zi, yi in zip(z, y):
            w = counts[k][yi] / sum(counts[q][yi] for q in range(K))
            s += w * -np_log_softmax(W[k] @ zi + b[k])[yi]
        total += s / len(z)
    return total


HEADS = dict(
    W=np.array([[[1.0, -0.5, 0.2], [0.3, 0.8, -1.0], [-0.7, 0.1, 0.4], [0.2, 0.2, 0.2]],
                [[-0.3, 0.9, 0.0], [0.5, -0.2, 0.7], [1.1, 0.3, -0.6], [-0.4, 0.6, 0.1]]]),
    b=np.array([[0.1, -0.2, 0.0, 0.3], [0.0, 0.05, -0.1, 0.2]]),
    counts=np.array([[31, 1, 7, 1], [1, 12, 3, 1]]),  # client 0 saw label 0 a lot, client 1 label 1; label 3 nobody
)


def test_label_weights_and_qualified_labels_from_counts():
    counts = torch.tensor(HEADS["counts"])
    w = fg.label_weights(counts).numpy()
    assert w.shape == (4, 2)
    assert np.allclose(w[0], [31 / 32, 1 / 32]) and np.allclose(w[1], [1 / 13, 12 / 13])
    assert np.allclose(w[2], [0.7, 0.3]) and np.allclose(w[3], [0.5, 0.5])
    assert fg.qualified_labels(counts).tolist() == [0, 1, 2]  # nobody counted label 3 more than the initial one


def test_diversity_loss_matches_pairwise_formula():
    rng = np.random.default_rng(0)
    eps, z = rng.random((6, 5)), rng.normal(size=(6, 3))
    got = fg.diversity_loss(torch.tensor(eps), torch.tensor(z)).item()
    assert got == pytest.approx(np_diversity(eps, z), rel=1e-12)


def test_generator_objective_matches_direct_computation():
    rng = np.random.default_rng(1)
    z, eps = rng.normal(size=(5, 3)), rng.random((5, 4))
    y = np.array([0, 1, 2, 0, 1])
    W, b, counts = HEADS["W"], HEADS["b"], HEADS["counts"]
    weights = fg.label_weights(torch.tensor(counts))
    t = fg.teacher_loss(torch.tensor(W), torch.tensor(b), torch.tensor(z), torch.tensor(y), weights).item()
    assert t == pytest.approx(np_teacher(W, b, z, y, counts), rel=1e-12)
    j = fg.generator_objective(torch.tensor(W), torch.tensor(b), torch.tensor(z), torch.tensor(eps), torch.tensor(y),
                               weights, eta=0.7).item()
    assert j == pytest.approx(np_teacher(W, b, z, y, counts) + 0.7 * np_diversity(eps, z), rel=1e-12)


def test_client_regulariser_matches_direct_computation():
    rng = np.random.default_rng(2)
    head = nn.Linear(3, 4).double()
    W, b = head.weight.detach().numpy(), head.bias.detach().numpy()
    logits_real = rng.normal(size=(3, 4))
    z_own, z_s = rng.normal(size=(3, 3)), rng.normal(size=(5, 3))
    y_s = np.array([0, 3, 1, 1, 2])
    alpha, beta, ratio = 2.5, 0.8, 5 / 3
    got = fg.client_regulariser(head, torch.tensor(logits_real), torch.tensor(z_own), torch.tensor(z_s),
                                torch.tensor(y_s), alpha, beta, ratio).item()
    ce = np.mean([-np_log_softmax(W @ z + b)[t] for z, t in zip(z_s, y_s)])
    kl = 0.0
    for z, lr in zip(z_own, logits_real):
        p = np.exp(np_log_softmax(W @ z + b))
        kl += np.sum(p * (np.log(p) - np_log_softmax(lr)))
    kl /= len(z_own)
    assert got == pytest.approx(ratio * alpha * ce + beta * kl, rel=1e-10)


def test_client_regulariser_gradient_reaches_the_head_only_through_generated_samples():
    head = nn.Linear(3, 4)
    logits = torch.randn(2, 4, requires_grad=True)
    loss = fg.client_regulariser(head, logits, torch.randn(2, 3), torch.randn(5, 3), torch.tensor([0, 1, 2, 3, 0]),
                                 1.0, 0.0, 1.0)
    loss.backward()
    assert head.weight.grad.abs().sum() > 0 and logits.grad.abs().sum() == 0  # beta = 0: only Eq. 5's CE


def test_coefficients_decay_like_the_authors_code():
    assert fg.decayed(10.0, 0) == 10.0 and fg.decayed(10.0, 3) == pytest.approx(10.0 * 0.98 ** 3)
    assert fg.decayed(10.0, 10_000) == 1e-4


def test_generator_training_makes_the_heads_predict_the_conditioning_label():
    """Two fixed heads that each know half of the labels: the trained generator's samples are classified as their
    conditioning label by the head of the client that holds that label."""
    torch.manual_seed(0)
    alg = fg.FedGen(generator_steps=300, generator_lr=3e-3, generator_weight_decay=0.0, hidden=32, noise_dim=8)
    alg.generator = fg.Generator(4, 3, hidden=32, noise_dim=8)
    alg.generator_opt = torch.optim.Adam(alg.generator.parameters(), lr=3e-3)
    alg.generator_rounds = 0
    heads = [(torch.tensor(HEADS["W"][k], dtype=torch.float32), torch.tensor(HEADS["b"][k], dtype=torch.float32))
             for k in range(2)]
    counts = torch.tensor([[50, 1, 50, 1], [1, 50, 1, 50]])
    g = torch.Generator().manual_seed(0)
    losses = alg.train_generator(heads, counts, g)
    assert losses["generator_teacher_loss"] > 0
    y = torch.arange(4).repeat(50)
    with torch.no_grad():
        z, _ = alg.generator.sample(y, g)
        owner = torch.tensor([0, 1, 0, 1])[y]
        w = torch.stack([h[0] for h in heads])[owner]
        b = torch.stack([h[1] for h in heads])[owner]
        pred = (torch.einsum("ncd,nd->nc", w, z) + b).argmax(1)
    assert (pred == y).float().mean() > 0.95
    assert alg.generator_opt.param_groups[0]["lr"] == pytest.approx(alg.generator_lr * 0.98)


def test_strided_cnn_is_the_authors_mnist_network():
    m = build_model("strided_cnn", in_channels=1, num_classes=10, input_size=28)
    assert m.head.in_features == 32 and m(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert isinstance(m.features[-1], nn.Linear) and m.features[-1].in_features == 16 * 7 * 7  # no ReLU after it
    c = build_model("strided_cnn", in_channels=3, num_classes=2, input_size=84, channels=[16, 32, 64], pool=True)
    assert c.features[-1].in_features == 64 and c(torch.zeros(1, 3, 84, 84)).shape == (1, 2)


def smoke_spec(method="FedGen", col=0):
    paper = load_paper("fedgen")
    rows = [r["label"] for r in paper["tables"]["table1"]["rows"]]
    return resolve_cell(paper, "table1", rows.index(method), col, "smoke").specs[0]


def make_context(spec):
    from common.fl.engine import RunContext
    from common.train import load_data_and_partition, model_factory
    data, parts = load_data_and_partition(spec, "data")
    make_model = model_factory(spec, data, torch.device("cpu"))
    torch.manual_seed(spec["seed"])
    return RunContext(spec=spec, data=data, parts=parts, model=make_model(), make_model=make_model,
                      device=torch.device("cpu"), data_root="data")


def test_local_loss_is_ce_in_round_zero_and_adds_the_regulariser_later():
    spec = smoke_spec()
    ctx = make_context(spec)
    alg = fg.FedGen(**{k: v for k, v in spec["method"].items() if k != "name"})
    alg.setup(ctx)
    model = ctx.model
    idx = ctx.parts[0][:8]
    x, y = ctx.data.train.x[idx], ctx.data.train.y[idx]
    alg.round_index, alg.round_counts = 0, torch.ones(10, dtype=torch.int64)
    alg.batch_gen = torch.Generator().manual_seed(1)
    model.eval()
    assert alg.local_loss(model, x, y).item() == pytest.approx(nn.functional.cross_entropy(model(x), y).item())
    assert alg.round_counts.sum().item() == 10 + 8
    alg.round_index = 3
    alg.batch_gen = torch.Generator().manual_seed(5)
    got = alg.local_loss(model, x, y).item()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        z_own = alg.generator(y, torch.rand((8, alg.noise_dim), generator=g))
        y_s = alg.available[torch.randint(len(alg.available), (alg.gen_batch,), generator=g)]
        z_s = alg.generator(y_s, torch.rand((alg.gen_batch, alg.noise_dim), generator=g))
        logits = model(x)
        ce = nn.functional.cross_entropy(logits, y).item()
        p = torch.softmax(model.head(z_own), 1).double()
        kl = (p * (p.log() - torch.log_softmax(logits, 1).double())).sum(1).mean().item()
        teacher = nn.functional.cross_entropy(model.head(z_s), y_s).item()
    a, b = 10 * 0.98 ** 3, 10 * 0.98 ** 3
    ratio = alg.gen_batch / spec["training"]["batch_size"]
    assert got == pytest.approx(ce + ratio * a * teacher + b * kl, rel=1e-5)


def test_smoke_run_is_repeatable_and_logs_generator_losses(tmp_path):
    from common.train import execute
    train_spec = lambda s: execute(s, progress=False)
    spec = smoke_spec()
    a, b = train_spec(spec), train_spec(spec)
    assert a["metrics"]["test_accuracy"] == b["metrics"]["test_accuracy"]
    assert len(a["metrics"]["generator_teacher_loss"]) == spec["training"]["rounds"]
    # the generator travels to each client: more bytes down than FedAvg's model alone
    fedavg = train_spec(smoke_spec("FedAvg"))
    assert a["metrics"]["bytes_down"][0][0] > fedavg["metrics"]["bytes_down"][0][0]


def test_best_accuracy_mean_of_top_rounds():
    r = {"metrics": {"test_accuracy": [0.5, 0.9, 0.7, 0.8, 0.6]}}
    assert best_accuracy(r)[0] == pytest.approx(90.0)
    assert best_accuracy(r, top=3)[0] == pytest.approx(80.0)


# --- paper-scale loaders on small files written here -----------------------------------------------------------
def test_fake_emnist_letters_loads_with_labels_from_zero(tmp_path):
    raw = tmp_path / "EMNIST" / "raw"
    assert len(missing_files("emnist_letters", tmp_path)) == 4
    rng = np.random.default_rng(0)
    labels = {"train": np.array([1, 26, 5, 13]), "test": np.array([2, 26])}
    for part, y in labels.items():
        write_idx(raw / f"emnist-letters-{part}-images-idx3-ubyte", rng.integers(0, 256, (len(y), 28, 28)))
        write_idx(raw / f"emnist-letters-{part}-labels-idx1-ubyte", y)
    assert missing_files("emnist_letters", tmp_path) == []
    d = load_dataset("emnist_letters", data_root=tmp_path)
    assert d.num_classes == 26 and d.input_shape == (1, 28, 28)
    assert d.train.y.tolist() == [0, 25, 4, 12] and d.test.y.tolist() == [1, 25]
    assert float(d.train.x.max()) <= 1.0


def test_emnist_letters_missing_files_are_named(tmp_path):
    with pytest.raises(DatasetMissing, match="emnist-letters-train-images-idx3-ubyte"):
        load_dataset("emnist_letters", data_root=tmp_path)


def test_fake_celeba_smiling_loads_from_an_image_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("PAPERBENCH_CACHE", str(tmp_path / "cache"))
    base = tmp_path / "celeba-smiling"
    for split, n in (("train", 3), ("test", 1)):
        for label, cls in enumerate(("not_smiling", "smiling")):
            for k in range(n):
                p = base / split / cls / f"{k}.{'png' if k % 2 == 0 else 'jpg'}"
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (84, 84), (40 + 160 * label, 90, 90)).save(p)
    assert missing_files("celeba_smiling", tmp_path) == []
    d = load_dataset("celeba_smiling", data_root=tmp_path)
    assert d.num_classes == 2 and d.input_shape == (3, 84, 84)
    assert d.train.y.tolist() == [0, 0, 0, 1, 1, 1] and d.test.y.tolist() == [0, 1]
    red = d.train.x[:, 0].mean(dim=(1, 2))
    assert torch.all((red > 0.5) == d.train.y.bool())


def test_celeba_smiling_missing_folders_are_named(tmp_path):
    missing = missing_files("celeba_smiling", tmp_path)
    assert str(tmp_path / "celeba-smiling" / "train" / "smiling") + "/" in missing and len(missing) == 4
    with pytest.raises(DatasetMissing, match="celeba-smiling"):
        load_dataset("celeba_smiling", data_root=tmp_path)
