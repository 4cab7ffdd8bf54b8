"""Run identity, provenance and atomic result files."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def run_id(spec: dict) -> str:
    """A run is named by the hash of its fully resolved spec, so identical runs are shared between papers."""
    return hashlib.sha256(canonical_json(spec).encode()).hexdigest()[:12]


def write_json_atomic(path: str | Path, obj) -> None:
    """Readers never see a half-written file: write a temporary file in the same folder, then rename."""
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_set() -> str:
    """The instruction set torch's CPU kernels use here ('avx2', 'avx512', ...): float32 results are bit-identical
    across machines of one set and differ in the last digits between sets (their kernels sum in other orders)."""
    import torch
    return torch.backends.cpu.get_cpu_capability().lower().replace(" ", "_")


def provenance(device: str, threads: int) -> dict:
    import torch
    versions = {}
    for pkg in ("torch", "torchvision", "numpy", "scikit-learn", "mlxtend", "scikit-image", "pillow", "snakemake"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    dev = device
    if device.startswith("cuda") and torch.cuda.is_available():
        dev = f"{device} ({torch.cuda.get_device_name()})"
    return {
        "commit": git_commit(),
        "python": sys.version.split()[0],
        "packages": versions,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_set": cpu_set(),
        "device": dev,
        "threads": threads,
    }


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
