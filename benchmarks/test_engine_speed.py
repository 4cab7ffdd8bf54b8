"""pytest-benchmark timings of one federated round of the engine_speed workload (small CNN), engine against the
plain PyTorch loop, and a check that both follow the same trajectory. Not part of the default test run
(pyproject's testpaths is tests/); run it with

    python -m pytest benchmarks/ --benchmark-columns=min,median,max
"""
import pytest

pytest.importorskip("pytest_benchmark")

import torch  # noqa: E402

from benchmarks.engine_speed import (ACCURACY_TOLERANCE, load, plain_fedavg, run_engine,  # noqa: E402
                                     weight_diffs, workload)

IMPLEMENTATIONS = {"engine": run_engine, "plain": plain_fedavg}


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
