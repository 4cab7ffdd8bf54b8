"""Communication accounting in the engine: bytes per client per round equal hand-computed counts."""
import torch

from common.fl import FederatedRun, get_algorithm
from common.fl.communication import dense_bytes, sparse_bytes, state_bytes
from common.report.metrics import accuracy_at_bytes, bytes_per_round, bytes_to_target, time_to_target

from test_fl import make_ctx

# tests.test_fl.tiny_model: Linear(16, 8), BatchNorm1d(8), head Linear(8, 3)
PARAMETERS = (16 * 8 + 8) + (8 + 8) + (8 * 3 + 3)  # 179 float32
BUFFERS = 8 + 8  # running mean and variance, float32; plus num_batches_tracked, one int64
MODEL_BYTES = 4 * (PARAMETERS + BUFFERS) + 8  # 788


def run(method, **kw):
    ctx = make_ctx(method, **kw)
    hist = FederatedRun(ctx, get_algorithm(method)).train(progress=False)
    return hist


def test_encodings_by_hand():
    assert dense_bytes([torch.zeros(3, 4), torch.zeros(5, dtype=torch.int64)]) == 3 * 4 * 4 + 5 * 8
    assert dense_bytes([torch.zeros(7, dtype=torch.float16)]) == 14
    assert sparse_bytes(10) == 10 * (4 + 4)
    assert sparse_bytes(10, value_bytes=2, index_bytes=2) == 40
    assert state_bytes({"a": torch.zeros(2), "b": torch.zeros(3)}, ["b"]) == 12


def test_fedavg_sends_and_receives_the_whole_model_per_client_per_round():
    hist = run({"name": "fedavg"}, rounds=3, fraction=0.5)
    assert [len(c) for c in hist.extra["clients"]] == [3, 3, 3]
    assert hist.extra["bytes_up"] == [[MODEL_BYTES] * 3] * 3
    assert hist.extra["bytes_down"] == [[MODEL_BYTES] * 3] * 3


def test_scaffold_adds_its_control_variates_both_ways():
    hist = run({"name": "scaffold"}, rounds=2, fraction=0.5)
    assert hist.extra["bytes_up"] == [[MODEL_BYTES + 4 * PARAMETERS] * 3] * 2
    assert hist.extra["bytes_down"] == [[MODEL_BYTES + 4 * PARAMETERS] * 3] * 2


def test_local_entries_never_travel():
    hist = run({"name": "singleset"}, rounds=2, fraction=0.5)
    assert hist.extra["bytes_up"] == [[0] * 3] * 2 and hist.extra["bytes_down"] == [[0] * 3] * 2


def test_local_steps_replace_epochs():
    ctx = make_ctx({"name": "fedavg"}, rounds=1, fraction=1.0)
    ctx.spec["training"]["local_steps"] = 4  # 30 samples per client in batches of 16: two epochs' worth
    run_ = FederatedRun(ctx, get_algorithm(ctx.spec["method"]))
    run_.algo.setup(ctx)
    assert run_.local_train(0, 0)[1] == 4


def fake_result(accuracy, up, down, train_seconds=None):
    rounds = len(accuracy)
    return {"metrics": {"round": list(range(1, rounds + 1)), "test_accuracy": accuracy, "clients": [[0, 1]] * rounds,
                        "bytes_up": [[up, up]] * rounds, "bytes_down": [[down, down]] * rounds,
                        "train_seconds": train_seconds or [1.0] * rounds},
            "spec": {"training": {"rounds": rounds}}}


def test_report_metrics_on_bytes_by_hand():
    res = fake_result([0.5, 0.7, 0.9], up=1_000_000, down=2_000_000)  # 6 MB per round over two clients
    assert bytes_to_target(res, 0.7) == (12.0, False)
    assert bytes_to_target(res, 0.7, direction="up") == (4.0, False)
    assert bytes_to_target(res, 0.95) == (19.0, True)  # never reached: all 18 MB + 1
    assert bytes_per_round(res) == (1.0, False)
    assert accuracy_at_bytes(res, 12.0) == (70.0, False)
    assert accuracy_at_bytes(res, 5.0) == (0.0, False)
    # 8 Mbit/s links and 10 ms latency: per round 2 * 0.01 + 3 MB / 1 MB/s = 3.02 s on the wire, 0.5 s compute
    assert abs(time_to_target(res, 0.7, bandwidth_mbit=8, latency_ms=10)[0] - 2 * 3.52) < 1e-9
    assert abs(time_to_target(res, 0.7, bandwidth_mbit=8, latency_ms=10, compute=False)[0] - 2 * 3.02) < 1e-9
    res["metrics"]["train_seconds"] = [1.0, 9.0, 1.0]  # a round slowed by another process: the median counts
    assert abs(time_to_target(res, 0.9, bandwidth_mbit=8, latency_ms=10)[0] - 3 * 3.52) < 1e-9
