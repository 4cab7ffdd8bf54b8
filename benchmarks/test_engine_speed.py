"""pytest-benchmark timings of one federated round of the engine_speed workload (small CNN), engine against the
plain PyTorch loop and the round's clients batched through vmap, and checks that they follow the same trajectory. Not part of the default test run
(pyproject's testpaths is tests/); run it with

    python -m pytest benchmarks/ --benchmark-columns=min,median,max
"""
import pytest

pytest.importorskip("pytest_benchmark")

import torch  # noqa: E402

from benchmarks.engine_speed import (ACCURACY_TOLERANCE, load, plain_fedavg, run_batched,  # noqa: E402
                                     run_engine, weight_diffs, workload)

IMPLEMENTATIONS = {"engine": run_engine, "plain": plain_fedavg, "clients batched (vmap)": run_batched}


@pytest.fixture(scope="module")
def cnn():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    spec = workload("cnn", rounds=1)
    yield (spec, *load(spec))
    torch.set_num_threads(threads)


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_one_round(benchmark, cnn, impl):
    benchmark.group = "one FedAvg round, cnn, 8 of 20 clients, E=2, 1 thread"
    result = benchmark.pedantic(IMPLEMENTATIONS[impl], args=cnn, rounds=3, iterations=1, warmup_rounds=1)
    assert len(result["accuracy"]) == 1


def test_engine_follows_plain_loop(cnn):
    spec, data, parts = cnn
    spec = {**spec, "training": {**spec["training"], "rounds": 2}}
    a, b = run_engine(spec, data, parts), plain_fedavg(spec, data, parts)
    assert max(abs(x - y) for x, y in zip(a["accuracy"], b["accuracy"])) <= ACCURACY_TOLERANCE
    assert max(weight_diffs(a["states"], b["states"])) < 1e-5  # rounding of the server step only


def test_batched_clients_follow_the_engine(cnn):
    """Same batches and SGD steps; grouped convolutions round differently, which lr 0.1 amplifies over the steps."""
    spec, data, parts = cnn
    spec = {**spec, "training": {**spec["training"], "rounds": 2}}
    a, b = run_engine(spec, data, parts), run_batched(spec, data, parts)
    assert max(abs(x - y) for x, y in zip(a["accuracy"], b["accuracy"])) <= ACCURACY_TOLERANCE
    assert max(weight_diffs(a["states"], b["states"])) < 1e-2
