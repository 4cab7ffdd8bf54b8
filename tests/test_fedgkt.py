"""FedGKT (He et al. 2020): the client's and the server's losses against direct numpy formulas, FLOPs and parameters
against hand counts, the split network against the paper's edge/FedAvg ratios, what travels (features, logits,
labels; never weights), and the paper-scale datasets on files the test writes."""
import numpy as np
import pytest
import torch
from torch import nn

from common.data import Dataset, Split, load_dataset
from common.experiments import load_paper, resolve_cell
from common.fl import FederatedRun, RunContext, get_algorithm
from common.models import build_model
from common.models.compute import client_compute, forward_flops, parameter_count
from common.models.split import SplitNet
from papers.fedgkt.method import TEACHER_EPS, client_loss, server_loss

T, ALPHA = 3.0, 0.7


def np_log_softmax(z):
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def np_kd(student, teacher, t):
    """The authors' KL_Loss: T^2 * mean_i sum_j q_ij (log q_ij - log p_ij), q = softmax(teacher / T) + 1e-7 (not
    renormalised), log p = log_softmax(student / T)."""
    q = np.exp(np_log_softmax(teacher / t)) + 1e-7
    log_p = np_log_softmax(student / t)
    return t * t * np.mean(np.sum(q * (np.log(q) - log_p), axis=1))


def np_ce(logits, y):
    return -np.mean(np_log_softmax(logits)[np.arange(len(y)), y])


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(6, 5, generator=g, dtype=torch.float64) * 3, torch.randn(6, 5, generator=g, dtype=torch.float64) * 3,
            torch.randint(0, 5, (6,), generator=g))


def test_server_loss_is_kd_from_client_logits_plus_alpha_ce(batch):
    server, client, y = batch
    got = server_loss(server, y, client, ALPHA, T).item()
    want = np_kd(server.numpy(), client.numpy(), T) + ALPHA * np_ce(server.numpy(), y.numpy())
    assert got == pytest.approx(want, rel=1e-10)
    assert TEACHER_EPS == 1e-7
    # without distillation on the server: cross-entropy alone
    assert server_loss(server, y, client, ALPHA, T, distill=False).item() == pytest.approx(np_ce(server.numpy(),
                                                                                                   y.numpy()))


def test_client_loss_is_ce_plus_alpha_kd_from_server_logits(batch):
    edge, server, y = batch
    got = client_loss(edge, y, server, ALPHA, T).item()
    want = np_ce(edge.numpy(), y.numpy()) + ALPHA * np_kd(edge.numpy(), server.numpy(), T)
    assert got == pytest.approx(want, rel=1e-10)
    # before the first server update there are no server logits: cross-entropy alone
    assert client_loss(edge, y, None, ALPHA, T).item() == pytest.approx(np_ce(edge.numpy(), y.numpy()))


def test_losses_send_no_gradient_to_the_teacher(batch):
    edge, server, y = (t.clone().requires_grad_(t.is_floating_point()) for t in batch)
    client_loss(edge, y, server, ALPHA, T).backward()
    assert edge.grad is not None and server.grad is None


def test_flops_and_parameters_of_a_tiny_layer_by_hand():
    conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)
    # every output entry (3 channels x 5 x 5) is a dot product of 2 x 3 x 3 inputs: 2 FLOPs per multiply-add
    assert forward_flops(conv, (2, 5, 5)) == 2 * (3 * 5 * 5) * (2 * 3 * 3)
    assert parameter_count(conv) == 3 * 2 * 3 * 3
    lin = nn.Linear(4, 3)
    assert forward_flops(lin, (4,)) == 2 * 4 * 3 and parameter_count(lin) == 4 * 3 + 3


def test_split_network_counts_by_hand():
    """An edge of a stem alone (no blocks): conv 1 -> 4 channels 3x3 on 6x6, average pooling, linear 4 -> 3."""
    kw = dict(in_channels=1, num_classes=3, input_size=6, channels=4, edge_blocks=0, edge_block="basic",
              server_blocks=[1], server_widths=[4], server_block="basic")
    gkt, edge = build_model("split_resnet", part="gkt", **kw), build_model("split_resnet", part="edge", **kw)
    stem = 2 * (4 * 6 * 6) * (1 * 9)
    head = 2 * 4 * 3
    assert client_compute(gkt, (1, 6, 6))["flops"] == stem + head == client_compute(edge, (1, 6, 6))["flops"]
    params = 4 * 9 + 2 * 4 + (4 * 3 + 3)  # conv, BatchNorm's weight and bias, linear
    assert client_compute(gkt, (1, 6, 6))["parameters"] == params == parameter_count(edge)
    # the large CNN adds one basic block (two 3x3 convolutions 4 -> 4 at 6x6) before the same pooling and linear head
    large = build_model("split_resnet", part="large", **kw)
    block = 2 * 2 * (4 * 6 * 6) * (4 * 9)
    assert client_compute(large, (1, 6, 6))["flops"] == stem + block + head
    assert parameter_count(large) == params + 2 * (4 * 4 * 9 + 2 * 4)


def test_paper_split_has_the_abstracts_edge_ratios():
    """FedGKT's CIFAR pair (ResNet-8 edge of the authors' code, ResNet-56 = extractor + server body): the edge's
    FLOPs and parameters are 9-17x and 54-105x smaller, as the abstract says."""
    edge = client_compute(build_model("split_resnet", 3, 10, 32, part="gkt"), (3, 32, 32))
    large = client_compute(build_model("split_resnet", 3, 10, 32, part="large"), (3, 32, 32))
    assert 9 <= large["flops"] / edge["flops"] <= 17
    assert 54 <= large["parameters"] / edge["parameters"] <= 105
    # the stem's features have 16 channels at full resolution, as the authors' client sends
    net = build_model("split_resnet", 3, 10, 32, part="gkt")
    assert net.extractor(torch.zeros(2, 3, 32, 32)).shape == (2, 16, 32, 32)


def tiny_split_run(rounds=2, fraction=1.0, distill=True):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(120, 1, 8, 8, generator=g)
    y = x.flatten(1)[:, :3].argmax(1)
    data = Dataset("tiny", Split(x[:90], y[:90]), Split(x[90:], y[90:]), 3)
    parts = list(torch.arange(90).chunk(3))
    make = lambda: build_model("split_resnet", 1, 3, 8, part="gkt", channels=4, pool=True, edge_blocks=1,
                               edge_block="basic", server_blocks=[1], server_widths=[8], server_block="basic")
    spec = {"method": {"name": "fedgkt", "server_epochs": 2, "distill_on_server": distill}, "seed": 0,
            "training": {"rounds": rounds, "client_fraction": fraction, "local_epochs": 1, "batch_size": 16,
                         "lr": 1e-3, "optimizer": "adam", "weight_decay": 1e-4, "amsgrad": True}}
    torch.manual_seed(0)
    ctx = RunContext(spec=spec, data=data, parts=parts, model=make(), make_model=make, device=torch.device("cpu"),
                     data_root="data")
    run = FederatedRun(ctx, get_algorithm(spec["method"]))
    return run, run.train(progress=False)


def test_what_travels_is_features_logits_and_labels_never_weights():
    run, hist = tiny_split_run(rounds=3)
    algo = run.algo
    n = 30  # samples per client
    features = 4 * 4 * 4  # 4 channels at 4x4 after pooling
    assert hist.extra["bytes_up"] == [[n * (features + 3) * 4 + n] * 3] * 3
    # the server's logits of each client's samples come back from the second round on
    assert hist.extra["bytes_down"] == [[0] * 3, [n * 3 * 4] * 3, [n * 3 * 4] * 3]
    assert bool(algo.has_server_logits.all())
    # every client keeps its own edge model; the global state's edge half is never averaged or changed
    edges = [algo.edge_states[k] for k in range(3)]
    key = "extractor.0.weight"
    assert not torch.equal(edges[0][key], edges[1][key])
    assert set(edges[0]) == {k for k in run.final_state if k.split(".")[0] in ("extractor", "edge_body", "edge_head")}


def test_server_logits_are_the_last_server_epochs_outputs():
    """The logits sent back are the server's training-mode outputs of its last epoch, one row per sample."""
    run, _ = tiny_split_run(rounds=1)
    algo = run.algo
    assert algo.server_logits.shape == (90, 3) and bool(algo.has_server_logits.all())
    # they are not the final model's eval-mode predictions (BatchNorm in training mode, the model still moving)
    net: SplitNet = algo.server_net
    net.load_state_dict(run.final_state)
    algo.load_edge(net, 0)
    net.eval()
    with torch.no_grad():
        final = net(run.x[run.ctx.parts[0]])
    assert not torch.allclose(final, algo.server_logits[run.ctx.parts[0]])
    # server training with distillation differs from cross-entropy alone
    assert not torch.equal(tiny_split_run(rounds=1, distill=False)[0].algo.server_logits, algo.server_logits)


def test_fedgkt_needs_the_split_network():
    from test_fl import make_ctx
    ctx = make_ctx({"name": "fedgkt"})
    with pytest.raises(Exception, match="split network"):
        get_algorithm({"name": "fedgkt"}).setup(ctx)


@pytest.mark.parametrize("column,dataset", [(0, "cifar10"), (3, "cifar100"), (4, "cinic10")])
def test_paper_scale_runs_the_papers_setting(column, dataset):
    spec = resolve_cell(load_paper("fedgkt"), "accuracy", 0, column, "paper").specs[0]
    assert spec["dataset"]["name"] == dataset
    assert spec["partition"]["clients"] == 8 and spec["training"]["rounds"] == 200
    assert spec["training"]["batch_size"] == 256 and spec["training"]["optimizer"] == "adam"
    assert spec["method"]["server_epochs"] == 20 and spec["method"]["temperature"] == 3.0


def test_cinic10_loads_from_files_the_test_writes(tmp_path, monkeypatch):
    from test_image_folder_data import write_fake_cinic10
    monkeypatch.setenv("PAPERBENCH_CACHE", str(tmp_path / "cache"))
    write_fake_cinic10(tmp_path)
    ds = load_dataset("cinic10", data_root=tmp_path)
    net = build_model("split_resnet", ds.input_shape[0], ds.num_classes, ds.input_shape[-1], part="gkt")
    assert net.edge(ds.train.x[:4]).shape == (4, 10) and net(ds.test.x[:4]).shape == (4, 10)
