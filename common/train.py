"""Train one run from its resolved spec and write its results file.

    python -m common.train results/specs/<run>.json results/runs/<run>.json [--data-root data] [--device cpu]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from common.data import fingerprint, load_dataset, train_test_overlap
from common.data.partition import partition, partition_fingerprint
from common.errors import SuiteError, entry_point
from common.fl import FederatedRun, RunContext, get_algorithm
from common.models import build_model
from common.models.compute import client_compute
from common.results import provenance, read_spec, run_id, write_failed, write_json_atomic


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SuiteError(f"device '{device}' requested but no CUDA device is available")
    return torch.device(device)


def make_deterministic(device: torch.device, threads: int) -> None:
    """CPU kernels are deterministic for a fixed thread count; CUDA needs deterministic algorithms asked for."""
    torch.set_num_threads(threads)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def load_data_and_partition(spec: dict, data_root: str):
    """The run's dataset and its clients' index sets (the same for every run with this data, partition and seed)."""
    ds_spec = spec["dataset"]
    data = load_dataset(ds_spec["name"], data_root, ds_spec.get("train_limit"), ds_spec.get("test_limit"))
    part = dict(spec["partition"])
    parts = partition(data.train.y, part.pop("scheme"), seed=spec["seed"], domains=data.train.domain,
                      domain_names=data.domains, **part)
    return data, parts


def model_factory(spec: dict, data, dev: torch.device, data_root: str = "data"):
    def make_model():
        m = spec["model"]
        return build_model(m["name"], in_channels=data.input_shape[0], num_classes=data.num_classes,
                           input_size=data.input_shape[-1], data_root=data_root,
                           **{k: v for k, v in m.items() if k != "name"}).to(dev)
    return make_model


def save_model_atomic(path: Path, rid: str, state: dict) -> None:
    """The run's final global model (state_dict on the CPU), written under a temporary name first; a failed write
    (disk full) leaves the previous file intact and raises `WriteFailed` saying so."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, existed = path.with_name(f".{path.name}.tmp"), path.exists()
    try:
        torch.save({"run_id": rid, "state_dict": {k: v.detach().cpu() for k, v in state.items()}}, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch's zip writer reports a full disk as a RuntimeError
        tmp.unlink(missing_ok=True)
        raise write_failed(path, existed, e) from e


def execute(spec: dict, data_root: str = "data", device: str = "cpu", threads: int = 1,
            progress: bool = True, checkpoint: Path | None = None, model_out: Path | None = None) -> dict:
    """Run one federated experiment and return its result record (not yet written); with `model_out`, the final
    global model is saved there."""
    started, t0 = datetime.now(timezone.utc), time.perf_counter()
    dev = resolve_device(device)
    make_deterministic(dev, threads)
    algorithm = get_algorithm(spec["method"])
    data, parts = load_data_and_partition(spec, data_root)
    overlap = train_test_overlap(data)
    make_model = model_factory(spec, data, dev, str(data_root))

    torch.manual_seed(spec["seed"])
    ctx = RunContext(spec=spec, data=data, parts=parts, model=make_model(), make_model=make_model, device=dev,
                     data_root=str(data_root))
    run = FederatedRun(ctx, algorithm)
    hist = run.train(progress=progress, checkpoint=checkpoint)
    if model_out is not None:
        save_model_atomic(model_out, run_id(spec), run.final_state)
    return {
        "run_id": run_id(spec),
        "spec": spec,
        "status": hist.status,
        "metrics": {"round": hist.rounds, "test_accuracy": hist.test_accuracy, "test_loss": hist.test_loss,
                    "train_loss": hist.train_loss, **hist.extra},
        "final": {"test_accuracy": hist.test_accuracy[-1] if hist.test_accuracy and hist.status == "completed"
                  else None},
        "data": {
            "dataset": data.description,
            "fingerprint": fingerprint(data.train.x, data.train.y, data.test.x, data.test.y),
            "partition_fingerprint": partition_fingerprint(parts),
            "client_sizes": [len(p) for p in parts],
            "test_samples_in_train": overlap,
        },
        # counted after the algorithm's set-up, which may freeze part of the model (prompt tuning)
        "model": {"parameters": sum(p.numel() for p in ctx.model.parameters()),
                  "trainable_parameters": sum(p.numel() for p in ctx.model.parameters() if p.requires_grad),
                  # a model that says which part a client runs (a split network's edge): that part's forward FLOPs
                  # per sample and parameters, counted from it (common/models/compute.py)
                  **({"client": client_compute(ctx.model, tuple(data.input_shape))}
                     if hasattr(ctx.model, "client_model") else {})},
        "resumed_at_rounds": hist.resumed_at,
        "started": started.isoformat(timespec="seconds"),
        "wall_time_s": round(time.perf_counter() - t0, 3),
        "provenance": provenance(str(dev), threads),
    }


@entry_point
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spec", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--data-root", default="data")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--checkpoint", type=Path, help="save state after every round here; resume from it if present")
    ap.add_argument("--model-out", type=Path, help="save the final global model (state_dict) here")
    args = ap.parse_args(argv)
    spec = read_spec(args.spec)
    if args.checkpoint:
        args.checkpoint.parent.mkdir(parents=True, exist_ok=True)
    result = execute(spec, args.data_root, args.device, args.threads, progress=sys.stderr.isatty(),
                     checkpoint=args.checkpoint, model_out=args.model_out)
    write_json_atomic(args.out, result)
    if args.checkpoint:
        args.checkpoint.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
