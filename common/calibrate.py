"""Post-hoc methods applied to the final model of an already-trained run (e.g. CCVR's classifier calibration).

    python -m common.calibrate results/calibrations/<id>.spec.json results/models/<base>.pt \
        results/runs/<base>.json results/calibrations/<id>.json [--data-root data] [--device cpu]

A calibration spec is {"base": <the base run's spec>, "calibration": {"name": <method>, <params>}}; its id is the
hash of the spec, like a run's. The base run's data and client partition are rebuilt from its spec (and checked
against the fingerprints in its results file), its final global model is loaded, and the registered calibration
method changes the model in place. The result file has the layout of a run's, so the report reads it the same way:
`metrics` holds one entry, the calibrated model's test accuracy and loss (and the calibration's own final training
loss) after the base run's last round; `before` holds the base model's.

Papers register their methods with `@register_calibration("name")` in `papers/<paper>/method.py`: a class whose
`calibrate(model, ctx)` changes `model` in place and returns what it did (logged in the result file).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from common.data import Dataset, fingerprint
from common.data.partition import partition_fingerprint
from common.errors import SuiteError, entry_point
from common.fl.algorithms import build_registered, registrar
from common.fl.engine import evaluate
from common.results import provenance, read_result, read_spec, run_id, write_json_atomic

CALIBRATIONS: dict[str, type] = {}


register_calibration = registrar(CALIBRATIONS)


def get_calibration(spec: dict):
    """Instantiate the calibration method named by `spec['name']` with the remaining keys as its parameters."""
    return build_registered(CALIBRATIONS, spec, "calibration method")


@dataclass
class CalibrationContext:
    """What a calibration method may use: the base run's spec, data, client partition, seed and device."""
    spec: dict  # the calibration spec
    data: Dataset
    parts: list[torch.Tensor]
    device: torch.device
    seed: int


def load_model_file(path: Path, rid: str) -> dict:
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, garbage bytes, not a torch file: one message, not a traceback
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise SuiteError(f"model file {path} is unreadable ({type(e).__name__}: {reason}). Delete it and "
                         f"results/runs/{rid}.json, then run the same snakemake command again to retrain run {rid} "
                         f"(at start-up the workflow also moves such files aside by itself, with a warning).") from None
    if not isinstance(ck, dict) or "state_dict" not in ck:
        raise SuiteError(f"model file {path} holds no model (state_dict); delete it and results/runs/{rid}.json, "
                         f"then run the same snakemake command again to retrain run {rid}")
    if ck.get("run_id") != rid:
        raise SuiteError(f"{path} holds the model of run {ck.get('run_id')}, not of run {rid}")
    return ck["state_dict"]


def execute(spec: dict, model_path: Path, base_result: dict, data_root: str = "data", device: str = "cpu",
            threads: int = 1) -> dict:
    """Calibrate the base run's final model and return the result record (not yet written)."""
    from common.train import load_data_and_partition, make_deterministic, model_factory, resolve_device
    started, t0 = datetime.now(timezone.utc), time.perf_counter()
    base = spec["base"]
    base_id = run_id(base)
    if base_result.get("run_id") != base_id or base_result.get("spec") != base:
        raise SuiteError(f"the results file given is not that of run {base_id}, the base of this calibration")
    method = get_calibration(spec["calibration"])
    record = {"run_id": run_id(spec), "spec": spec, "base_run": base_id, "status": base_result["status"],
              "metrics": {"round": [], "test_accuracy": [], "test_loss": [], "train_loss": []},
              "before": None, "final": {"test_accuracy": None}, "calibration": None,
              "data": base_result["data"], "resumed_at_rounds": []}
    if base_result["status"] == "completed":
        dev = resolve_device(device)
        make_deterministic(dev, threads)
        data, parts = load_data_and_partition(base, data_root)
        fp = {"fingerprint": fingerprint(data.train.x, data.train.y, data.test.x, data.test.y),
              "partition_fingerprint": partition_fingerprint(parts)}
        for key, value in fp.items():
            if base_result["data"][key] != value:
                raise SuiteError(f"the data or partition rebuilt for run {base_id} differs from the one it was "
                                 f"trained on ({key} {value} != {base_result['data'][key]})")
        model = model_factory(base, data, dev, data_root)()
        model.load_state_dict(load_model_file(model_path, base_id))
        x_test, y_test = data.test.x.to(dev), data.test.y.to(dev)
        acc0, loss0 = evaluate(model, x_test, y_test)
        ctx = CalibrationContext(spec=spec, data=data, parts=parts, device=dev, seed=base["seed"])
        info = method.calibrate(model, ctx)
        acc, loss = evaluate(model, x_test, y_test)
        last_round = base_result["metrics"]["round"][-1]
        record["metrics"] = {"round": [last_round], "test_accuracy": [acc], "test_loss": [loss],
                             "train_loss": [info.pop("train_loss")]}
        record["before"] = {"test_accuracy": acc0, "test_loss": loss0}
        record["final"] = {"test_accuracy": acc}
        record["calibration"] = info
    record["started"] = started.isoformat(timespec="seconds")
    record["wall_time_s"] = round(time.perf_counter() - t0, 3)
    record["provenance"] = provenance(str(device), threads)
    return record


@entry_point
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spec", type=Path, help="calibration spec")
    ap.add_argument("model", type=Path, help="the base run's final model")
    ap.add_argument("base_result", type=Path, help="the base run's results file")
    ap.add_argument("out", type=Path)
    ap.add_argument("--data-root", default="data")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    record = execute(read_spec(args.spec), args.model, read_result(args.base_result), args.data_root,
                     args.device, args.threads)
    write_json_atomic(args.out, record)
    return 0


if __name__ == "__main__":
    # Run the imported module's main: papers register their methods in `common.calibrate`, not in `__main__`.
    from common.calibrate import main as _main
    sys.exit(_main())
