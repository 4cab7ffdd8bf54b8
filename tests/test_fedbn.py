"""FedBN and SingleSet: what stays on the clients, what the server averages, per-domain evaluation; FedBN's models."""
import pytest
import torch
from torch import nn

from common.data import Dataset, Split
from common.errors import SuiteError
from common.fl import FederatedRun, RunContext, get_algorithm
from common.fl.algorithms import weighted_mean
from common.fl.personal import client_of_domain
from common.models import Classifier, build_model
from common.report.metrics import domain_accuracy
from papers.fedbn.method import FedBN, batchnorm_keys


def bn_model():
    feats = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 6),
                          nn.BatchNorm1d(6), nn.ReLU())
    return Classifier(feats, 6, 3)


def two_domain_data():
    """Two domains with different feature statistics (the second shifted and scaled), as in feature-shift FL."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 1, 4, 4, generator=g)
    y = x.flatten(1)[:, :3].argmax(1)
    dom = (torch.arange(200) >= 100).long()
    x = torch.where(dom.view(-1, 1, 1, 1) == 1, 3 * x + 2, x)
    train, test = torch.arange(200) % 5 != 0, torch.arange(200) % 5 == 0
    return Dataset("two", Split(x[train], y[train], dom[train]), Split(x[test], y[test], dom[test]), 3,
                   domains=("plain", "shifted"))


def make_ctx(method, rounds=2):
    data = two_domain_data()
    parts = [torch.nonzero(data.train.domain == d).flatten() for d in range(2)]
    spec = {"method": method, "seed": 0,
            "training": {"rounds": rounds, "client_fraction": 1.0, "local_epochs": 1, "batch_size": 16, "lr": 0.1}}
    torch.manual_seed(0)
    return RunContext(spec=spec, data=data, parts=parts, model=bn_model(), make_model=bn_model,
                      device=torch.device("cpu"), data_root="data")


def recording(cls):
    """`cls` that records each client's state when local training begins and ends, and each new global state."""
    class Recorder(cls):
        def setup(self, ctx):
            super().setup(ctx)
            self.begins, self.ends, self.globals = [], [], []

        def begin_client(self, model, global_state, client):
            super().begin_client(model, global_state, client)
            self.begins.append((client, {k: v.clone() for k, v in model.state_dict().items()}))

        def end_client(self, model, global_state, client, steps):
            super().end_client(model, global_state, client, steps)
            self.ends.append((client, {k: v.clone() for k, v in model.state_dict().items()}))

        def server_update(self, global_state, client_states, weights, round_index):
            new = super().server_update(global_state, client_states, weights, round_index)
            self.globals.append({k: v.clone() for k, v in new.items()})
            return new
    return Recorder()


def run(cls, name, rounds=2):
    ctx = make_ctx({"name": name}, rounds)
    algo = recording(cls)
    hist = FederatedRun(ctx, algo).train(progress=False)
    return algo, hist, ctx


def test_batchnorm_keys_are_parameters_and_running_statistics():
    keys = batchnorm_keys(bn_model())
    assert keys == {f"features.{i}.{k}" for i in (2, 5)
                    for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    assert len(batchnorm_keys(build_model("digit_cnn", 3, 10, 28))) == 5 * 5


def test_fedbn_never_averages_batchnorm():
    algo, hist, ctx = run(FedBN, "fedbn")
    bn = batchnorm_keys(ctx.model)
    torch.manual_seed(0)
    init = bn_model().state_dict()  # the run's initial model (same seed)
    round1_ends = dict(algo.ends[:2])
    weights = [len(p) for p in ctx.parts]
    average = weighted_mean([round1_ends[0], round1_ends[1]], weights)
    # the two clients' BatchNorm layers did diverge, so "kept" and "averaged" are distinguishable
    assert not torch.allclose(round1_ends[0]["features.2.running_mean"], round1_ends[1]["features.2.running_mean"])
    for k in bn:
        # the server keeps its own (initial) BatchNorm entries: neither averaged nor taken from a client
        assert torch.equal(algo.globals[0][k], init[k]), k
    round2_begins = dict(algo.begins[2:])
    for client in (0, 1):
        for k, v in round2_begins[client].items():
            if k in bn:  # each client resumes with exactly its own locally trained BatchNorm entries
                assert torch.equal(v, round1_ends[client][k]), (client, k)
            elif v.is_floating_point():  # everything else is the FedAvg aggregate
                torch.testing.assert_close(v, average[k], rtol=1e-6, atol=1e-6)
    assert hist.status == "completed" and len(hist.rounds) == 2


def test_fedbn_non_bn_entries_equal_fedavg_aggregation():
    """Round one starts from the same model in both runs, so FedBN's global non-BN entries equal FedAvg's."""
    fedbn, _, ctx = run(FedBN, "fedbn", rounds=1)
    fedavg, _, _ = run(type(get_algorithm({"name": "fedavg"})), "fedavg", rounds=1)
    bn = batchnorm_keys(ctx.model)
    for k, v in fedavg.globals[0].items():
        if k not in bn:
            assert torch.equal(fedbn.globals[0][k], v), k
        elif v.is_floating_point():
            assert not torch.equal(fedbn.globals[0][k], v), k  # FedAvg does average BatchNorm


def test_singleset_never_communicates():
    algo, _, ctx = run(type(get_algorithm({"name": "singleset"})), "singleset")
    round1_ends, round2_begins = dict(algo.ends[:2]), dict(algo.begins[2:])
    for client in (0, 1):
        for k, v in round2_begins[client].items():
            assert torch.equal(v, round1_ends[client][k]), (client, k)


@pytest.mark.parametrize("name", ["fedbn", "singleset", "fedavg", "fedprox"])
def test_per_domain_metrics_are_logged(name):
    ctx = make_ctx({"name": name})
    hist = FederatedRun(ctx, get_algorithm({"name": name})).train(progress=False)
    last = hist.extra["domain_accuracy"][-1]
    assert set(last) == {"plain", "shifted"}
    assert hist.test_accuracy[-1] == pytest.approx(sum(last.values()) / 2)
    assert domain_accuracy({"metrics": hist.extra}, "shifted") == (100 * last["shifted"], False)


def test_fedbn_evaluates_each_domain_with_its_clients_batchnorm():
    from common.fl.engine import evaluate
    algo, hist, ctx = run(FedBN, "fedbn", rounds=1)
    model = bn_model()
    for client, name in enumerate(ctx.data.domains):
        # by hand: the final global model with this client's BatchNorm entries, on this client's domain
        model.load_state_dict({**algo.globals[0], **{k: v for k, v in dict(algo.ends)[client].items()
                                                      if k in batchnorm_keys(model)}})
        mask = ctx.data.test.domain == client
        acc, _ = evaluate(model, ctx.data.test.x[mask], ctx.data.test.y[mask])
        assert hist.extra["domain_accuracy"][-1][name] == acc


def test_personalised_evaluation_needs_one_client_per_domain():
    dom = torch.tensor([0, 0, 1, 1])
    assert client_of_domain(dom, [torch.tensor([2, 3]), torch.tensor([0, 1])], 2) == [1, 0]
    with pytest.raises(SuiteError, match="one client per domain"):
        client_of_domain(dom, [torch.tensor([0, 2]), torch.tensor([1, 3])], 2)
    with pytest.raises(SuiteError, match="held by no client"):
        client_of_domain(dom, [torch.tensor([0, 1])], 2)


def test_domain_accuracy_metric_errors():
    with pytest.raises(ValueError, match="no per-domain accuracy"):
        domain_accuracy({"metrics": {}}, "SVHN")
    with pytest.raises(ValueError, match="no domain 'SVHN'"):
        domain_accuracy({"metrics": {"domain_accuracy": [{"MNIST": 0.5}]}}, "SVHN")


# ---------------------------------------------------------------- models

def test_digit_cnn_matches_fedbn_architecture():
    model = build_model("digit_cnn", in_channels=3, num_classes=10, input_size=28)
    conv = lambda i, o: i * o * 25 + o  # noqa: E731
    lin = lambda i, o: i * o + o  # noqa: E731
    bn = lambda c: 2 * c  # noqa: E731
    expected = (conv(3, 64) + bn(64) + conv(64, 64) + bn(64) + conv(64, 128) + bn(128)
                + lin(128 * 7 * 7, 2048) + bn(2048) + lin(2048, 512) + bn(512) + lin(512, 10))
    assert sum(p.numel() for p in model.parameters()) == expected == 14_219_210
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 3
    assert sum(isinstance(m, nn.BatchNorm1d) for m in model.modules()) == 2
    assert model(torch.randn(2, 3, 28, 28)).shape == (2, 10) and model.feature_dim == 512
    narrow = build_model("digit_cnn", 3, 10, 28, channels=[16, 16, 32], hidden=[128, 64])
    assert narrow(torch.randn(2, 3, 28, 28)).shape == (2, 10)


def test_alexnet_bn_shapes():
    model = build_model("alexnet_bn", in_channels=3, num_classes=10, input_size=256).eval()
    assert model(torch.randn(1, 3, 256, 256)).shape == (1, 10)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 5
    assert sum(isinstance(m, nn.BatchNorm1d) for m in model.modules()) == 2


def test_fedbn_resumes_with_each_clients_batchnorm(tmp_path):
    """A crash after round one and a restart from the checkpoint end bit-identical to an uninterrupted run:
    the clients' own BatchNorm entries are part of the checkpoint."""
    class Crash(Exception):
        pass

    class CrashingFedBN(FedBN):
        def server_update(self, global_state, client_states, weights, round_index):
            if round_index == 1:
                raise Crash
            return super().server_update(global_state, client_states, weights, round_index)

    whole = FederatedRun(make_ctx({"name": "fedbn"}, rounds=3), FedBN()).train(progress=False)
    ckpt = tmp_path / "run.pt"
    with pytest.raises(Crash):
        FederatedRun(make_ctx({"name": "fedbn"}, rounds=3), CrashingFedBN()).train(progress=False, checkpoint=ckpt)
    resumed = FederatedRun(make_ctx({"name": "fedbn"}, rounds=3), FedBN()).train(progress=False, checkpoint=ckpt)
    assert resumed.resumed_at == [1]
    assert resumed.test_accuracy == whole.test_accuracy and resumed.train_loss == whole.train_loss
    assert resumed.extra["domain_accuracy"] == whole.extra["domain_accuracy"]
