"""From a paper's `paper.yaml` to the runs it needs.

A table cell is described in the paper's own terms (`set:` with the paper's values, e.g. local_epochs: 40).
A scale turns that into a concrete run: it supplies the base spec, translates paper values to the values used
at this scale (`translate:`; null = not run at this scale) and overrides method hyper-parameters. Each resolved
spec plus a seed is one run, named by the hash of its spec (`common.results.run_id`).

Two further ways to describe cells, for papers that compare methods over several tasks and tuned hyper-parameters:
- `task: <name>` in a cell's settings names a bundle of settings (data, partition, model, schedule) that each scale
  defines under `tasks:` (null = not run at this scale); the bundle's values are already the scale's own.
- `grid:` on a table ({dotted key: [values]}, replaced per scale by `grids: {<table>: ...}`) makes every cell a
  set of grid points, one run per point and seed; the report shows the best point. A `method.*` axis applies only
  to the methods that list that hyper-parameter.

A method hyper-parameter may also differ per method in one cell: `method.mu: {MOON: 5, FedProx: 0.01}` sets `mu` of
the methods labelled MOON and FedProx (as a paper tunes it per method and dataset) and nothing for the others.

A method with `base: <label>` is not trained: it post-processes the final models of the runs of method <label> in
the same cell (e.g. CCVR's classifier calibration). Its cells hold calibration specs, {"base": <the base run's
spec>, "calibration": <the method's remaining keys>}, named by their hash like runs; the base runs are ordinary
runs, shared with every table and paper that uses them.
"""
from __future__ import annotations

import copy
import itertools
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import jsonschema
import yaml

from common.errors import SuiteError
from common.results import run_id

REPO = Path(__file__).resolve().parent.parent
PAPERS_DIR = REPO / "papers"
SCHEMA_DIR = REPO / "config"
EVAL_KEYS = ("target", "reference", "domain", "structure", "last_rounds", "logged", "minus", "reduce", "scale",
             "prefix", "direction", "budget_of", "bandwidth_mbit", "latency_ms", "compute", "entry", "at_round",
             "top", "quantity")  # cell keys that parameterise the metric, not the run


def known_papers() -> list[str]:
    return sorted(p.parent.name for p in PAPERS_DIR.glob("*/paper.yaml"))


def load_yaml(path: Path, schema: str | None = None) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SuiteError(f"file not found: {path}") from None
    except yaml.YAMLError as e:
        raise SuiteError(f"malformed YAML in {path}: {e}") from None
    if schema:
        validate(data, schema, path)
    return data


@lru_cache(maxsize=None)
def _validator(schema: str) -> jsonschema.Draft202012Validator:
    """Parsed once per process: every resolved run spec is validated, hundreds per workflow start."""
    return jsonschema.Draft202012Validator(yaml.safe_load((SCHEMA_DIR / schema).read_text()))


def validate(data, schema: str, where) -> None:
    errors = sorted(_validator(schema).iter_errors(data), key=lambda e: list(e.path))
    if errors:
        e = errors[0]
        loc = "/".join(str(p) for p in e.path) or "(top level)"
        raise SuiteError(f"{where}: invalid value at '{loc}': {e.message}")


@lru_cache(maxsize=None)
def load_paper(paper: str) -> dict:
    if paper not in known_papers():
        raise SuiteError(f"unknown paper '{paper}'; known papers: {', '.join(known_papers())}")
    data = load_yaml(PAPERS_DIR / paper / "paper.yaml", "paper.schema.yaml")
    _check_tables(paper, data)
    return data


def _check_tables(paper: str, data: dict) -> None:
    for tname, t in data["tables"].items():
        if len(t["paper"]) != len(t["rows"]) or any(len(r) != len(t["columns"]) for r in t["paper"]):
            raise SuiteError(f"papers/{paper}/paper.yaml: table '{tname}' paper values must be "
                             f"{len(t['rows'])} rows x {len(t['columns'])} columns")
        labels = [r["label"] for r in t["rows"]]
        for cell in (*t["rows"], *t["columns"], t):
            ref = cell.get("set", {}).get("reference")
            if ref is not None and (ref not in labels or t["metric"] != "rounds_to_target"):
                raise SuiteError(f"papers/{paper}/paper.yaml: table '{tname}': 'reference: {ref}' needs a "
                                 f"rounds_to_target table with a row labelled '{ref}' (rows: {', '.join(labels)})")
        for cell in (*t["rows"], *t["columns"]):
            m = cell.get("set", {}).get("method")
            if m is not None and m not in data["methods"]:
                raise SuiteError(f"papers/{paper}/paper.yaml: table '{tname}' uses method '{m}' "
                                 f"not defined under 'methods' ({', '.join(data['methods'])})")
    for label, m in data["methods"].items():
        base = m.get("base")
        if base is not None and (base not in data["methods"] or "base" in data["methods"][base]):
            raise SuiteError(f"papers/{paper}/paper.yaml: method '{label}' has base '{base}', which must be a "
                             f"trained method defined under 'methods' ({', '.join(data['methods'])})")


def is_calibration(spec: dict) -> bool:
    """A calibration spec (post-processing of a base run's final model), not a training run."""
    return "calibration" in spec


def training_spec(spec: dict) -> dict:
    """The training run a spec needs: itself, or the base run of a calibration."""
    return spec["base"] if is_calibration(spec) else spec


def _per_method(settings: dict, label: str) -> dict:
    """Resolve `method.<param>: {<label>: value, ...}` for method `label`; other labels get no value."""
    out = {}
    for key, value in settings.items():
        if key.startswith("method.") and isinstance(value, dict):
            if label in value:
                out[key] = value[label]
        else:
            out[key] = value
    return out


@dataclass(frozen=True)
class GridPoint:
    settings: tuple  # ((dotted key, value), ...) in the grid's axis order
    specs: tuple  # resolved spec per seed

    @property
    def run_ids(self) -> list[str]:
        return [run_id(s) for s in self.specs]


class RunsAndMetric:
    """What a table cell and a ceiling share: the run ids of their `specs` and the metric's `eval_args`."""

    @property
    def run_ids(self) -> list[str]:
        return [run_id(s) for s in self.specs]

    @property
    def eval(self) -> dict:
        return dict(self.eval_args)


@dataclass(frozen=True)
class Cell(RunsAndMetric):
    table: str
    row: int
    col: int
    specs: tuple  # resolved spec per seed (and grid point); empty when not run at this scale
    eval_args: tuple  # ((key, value), ...) for the metric
    skipped: str = ""  # why the cell is not run at this scale
    points: tuple = ()  # GridPoints when the table has a grid; empty otherwise
    confirm_seeds: tuple = ()  # a grid's best point is re-run with these seeds (the grid itself runs the first)


def _set_dotted(d: dict, key: str, value) -> None:
    *path, last = key.split(".")
    for p in path:
        d = d.setdefault(p, {})
    d[last] = value


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def scale_config(paper: dict, scale: str) -> dict:
    if scale not in paper["scales"]:
        raise SuiteError(f"paper '{paper['id']}' has no scale '{scale}'; it defines {', '.join(paper['scales'])}")
    return paper["scales"][scale]


def table_grid(paper: dict, table: str, scale: str) -> dict[str, list]:
    """The grid of a table at a scale ({dotted key: values}); empty for a table without one."""
    return scale_config(paper, scale).get("grids", {}).get(table, paper["tables"][table].get("grid", {}))


def resolve_cell(paper: dict, table: str, row: int, col: int, scale: str, seeds: list[int] | None = None,
                 method_label: str | None = None, use_grid: bool = True) -> Cell:
    """The runs of one table cell at a scale; `method_label` replaces the cell's method (for a calibration's base);
    without `use_grid`, a table with a grid resolves to its settings before the grid is applied."""
    t = paper["tables"][table]
    sc = scale_config(paper, scale)
    where = (f"papers/{paper['id']}/paper.yaml (table {table}, row '{t['rows'][row]['label']}', "
             f"column '{t['columns'][col]['label']}', scale {scale})")
    settings = {**t.get("set", {}), **t["columns"][col].get("set", {}), **t["rows"][row].get("set", {})}
    label = settings.pop("method") if method_label is None else method_label
    settings.pop("method", None)
    method = _deep_merge(paper["methods"][label], sc.get("methods", {}).get(label, {}))
    if "base" in method:
        base = resolve_cell(paper, table, row, col, scale, seeds, method_label=method["base"])
        if base.points:
            raise SuiteError(f"{where}: a method with a base (calibration) cannot be used in a table with a grid")
        calibration = {k: v for k, v in method.items() if k != "base"}
        return Cell(table, row, col, tuple({"base": s, "calibration": calibration} for s in base.specs),
                    base.eval_args, skipped=base.skipped)
    settings = _per_method(settings, label)
    task = settings.pop("task", None)

    def applies(key: str) -> bool:
        """A method hyper-parameter given per cell (or grid axis) applies only to the methods that have it."""
        return not key.startswith("method.") or key[len("method."):] in method

    settings = {k: v for k, v in settings.items() if applies(k)}
    translate = sc.get("translate", {})
    for key, value in list(settings.items()):
        mapping = translate.get(key, {})
        if not isinstance(value, (list, dict)) and value in mapping:  # a list value (layer indices) is never mapped
            if mapping[value] is None:
                return Cell(table, row, col, (), (), skipped=f"{key}={value} has no analog at scale '{scale}'")
            settings[key] = mapping[value]
    if task is not None:
        tasks = sc.get("tasks", {})
        if task not in tasks:
            raise SuiteError(f"{where}: task '{task}' is not defined under the scale's 'tasks' "
                             f"({', '.join(tasks) or 'none'})")
        if tasks[task] is None:
            return Cell(table, row, col, (), (), skipped=f"task {task} has no analog at scale '{scale}'")
        settings.update(tasks[task])
    spec = copy.deepcopy(sc["base"])
    spec["method"] = method
    eval_args = {k: settings.pop(k) for k in EVAL_KEYS if k in settings}
    for key, value in settings.items():
        _set_dotted(spec, key, value)
    seeds = sc["seeds"] if seeds is None else seeds
    axes = {k: v for k, v in table_grid(paper, table, scale).items() if applies(k) and use_grid}
    points = []
    for values in itertools.product(*axes.values()):
        point = copy.deepcopy(spec)
        for key, value in zip(axes, values):
            _set_dotted(point, key, value)
        validate({**point, "seed": 0}, "run.schema.yaml", where)
        # a grid is tuned on the first seed; its best point alone runs every other seed (`confirmations`)
        point_seeds = seeds[:1] if axes else seeds
        points.append(GridPoint(tuple(zip(axes, values)), tuple({**point, "seed": int(s)} for s in point_seeds)))
    specs = tuple(s for p in points for s in p.specs)
    return Cell(table, row, col, specs, tuple(sorted(eval_args.items())), points=tuple(points) if axes else (),
                confirm_seeds=tuple(int(s) for s in seeds[1:]) if axes else ())


def confirmations(paper_name: str, scale: str, seeds=None) -> dict[str, tuple]:
    """Every best-point re-run a paper needs: name -> (table, row, column, seed). Which grid point it trains is
    only known once the grid has run on the first seed, so it is named by its cell, not by a spec hash."""
    paper = load_paper(paper_name)
    out = {}
    for table in paper["tables"]:
        for row in table_cells(paper, table, scale, seeds):
            for cell in row:
                for s in cell.confirm_seeds:
                    out[confirmation_name(paper_name, cell, s)] = (cell.table, cell.row, cell.col, s)
    return out


def confirmation_name(paper_name: str, cell: Cell, seed: int) -> str:
    return f"{paper_name}-{cell.table}-r{cell.row}c{cell.col}-s{seed}"


def table_cells(paper: dict, table: str, scale: str, seeds=None, use_grid: bool = True) -> list[list[Cell]]:
    t = paper["tables"][table]
    return [[resolve_cell(paper, table, r, c, scale, seeds, use_grid=use_grid) for c in range(len(t["columns"]))]
            for r in range(len(t["rows"]))]


# Tables whose cells are accuracies (or rounds to an accuracy target) get a centralised ceiling per dataset analog.
ACCURACY_METRICS = ("final_accuracy", "best_accuracy", "mean_last_accuracy", "domain_accuracy", "site_dice")
CEILING_METRICS = (*ACCURACY_METRICS, "rounds_to_target")


@dataclass(frozen=True)
class Ceiling(RunsAndMetric):
    """The same model trained centrally on the pooled training data of a dataset analog, with the most rounds and
    local epochs any cell on that analog uses: the accuracy no federated method of the table can be expected to beat.
    `cells` are the (row, column) indices of the table cells on this analog."""
    dataset: str  # the analog's loader name
    train_limit: int | None
    eval_args: tuple
    specs: tuple  # one per seed
    cells: tuple
    where: str = ""  # the partition of a per-client ceiling (e.g. "10 clients × 2 shards")


def centralised_spec(specs: list[dict], ceiling: dict | None = None) -> dict:
    """Centralised training with the data, model and schedule of the longest of `specs` (most rounds x local
    epochs; the first of equals): one client holding every training sample the partition uses (a per-domain share
    stays a share; a held-out domain's training split is added: the ceiling of leave-one-domain-out), trained for
    the same rounds and local epochs. A schedule of local steps (data-parallel SGD)
    keeps its steps, each on a batch as large as the round's clients' batches together.

    Evaluated on the whole test set (never adapted), unless the table's `ceiling` says `per_client`: then the run
    keeps the cells' partition (the `centralised` method pools its clients for training, so the model is the same)
    and is evaluated as the cells are, on each client's own test split with their weighting; with
    `restrict_to_client_labels` each client's predictions are restricted to the classes of its training data. With
    `held_out_only` (a leave-one-domain-out table used for domain adaptation) the ceiling trains on the held-out
    (target) domain's labelled training split alone: the "train on target" oracle."""
    ceiling = ceiling or {}
    spec = copy.deepcopy(max(specs, key=lambda s: s["training"]["rounds"] * s["training"]["local_epochs"]))
    spec["method"] = {"name": "centralised"}
    cells_eval = spec.pop("evaluation", {})  # by default the pooled model on the whole test set, never adapted
    if ceiling.get("per_client"):
        spec["evaluation"] = {"per_client": True, "weighting": cells_eval.get("weighting", "clients")}
        if ceiling.get("restrict_to_client_labels"):
            spec["evaluation"]["restrict_to_client_labels"] = True
    elif ceiling.get("restrict_to_client_labels"):
        raise SuiteError("a ceiling restricted to each client's labels needs `per_client: true`")
    if ceiling.get("held_out_only") and ceiling.get("per_client"):
        raise SuiteError("a ceiling trained on the held-out domain alone is evaluated per domain, not `per_client`")
    t = spec["training"]
    if "local_steps" in t:  # data-parallel SGD: the pooled model takes the round's clients' batches as one batch
        clients = max(1, int(round(t["client_fraction"] * spec["partition"]["clients"])))
        t["batch_size"] *= clients
    if ceiling.get("per_client"):
        pass  # the partition's clients are the units of evaluation; `centralised` pools them for training
    elif spec["partition"]["scheme"] != "domain":
        spec["partition"] = {"scheme": "iid", "clients": 1}
    elif "hold_out" in spec["partition"] and ceiling.get("held_out_only"):
        # domain adaptation's oracle: the same model trained on the held-out (target) domain's labelled training
        # split alone
        spec["partition"] = {"scheme": "domain", "clients": 1, "only": [spec["partition"]["hold_out"]],
                             **({"fraction": spec["partition"]["fraction"]} if "fraction" in spec["partition"] else {})}
    elif "hold_out" in spec["partition"]:
        # leave-one-domain-out (FedDG): the ceiling of generalisation to the held-out domain is the model that
        # also trained on that domain's training split (the pooled data of every domain)
        spec["partition"] = {**spec["partition"], "clients": spec["partition"]["clients"] + 1}
        if "only" in spec["partition"]:  # the domains the cells train on, and the held-out one
            spec["partition"]["only"] = [*spec["partition"]["only"], spec["partition"]["hold_out"]]
        del spec["partition"]["hold_out"]
    spec["training"]["client_fraction"] = 1.0
    return spec


def partition_label(partition: dict) -> str:
    """A partition in words, e.g. "10 clients × 2 shards", "100 clients, Dirichlet α=0.1"."""
    n, scheme = partition["clients"], partition["scheme"]
    if scheme == "shards":
        return f"{n} clients × {partition['shards_per_client']} shards"
    if scheme == "dirichlet":
        return f"{n} clients, Dirichlet α={partition['alpha']}"
    return f"{n} clients, {scheme}"


def table_ceilings(paper: dict, table: str, scale: str, seeds=None) -> list[Ceiling]:
    """One ceiling per dataset analog (dataset and size, a per-domain partition, the metric's domain) of a table
    whose metric is an accuracy; none for other tables. In a rounds-to-target table the ceiling is read as its
    final accuracy, to compare with the target. A table whose `ceiling` says `per_client` (a personalised table)
    gets one per dataset analog and partition, evaluated as its cells are (`centralised_spec`)."""
    t = paper["tables"][table]
    if t["metric"] not in CEILING_METRICS:
        return []
    if "row" in t.get("ceiling", {}):
        return _row_ceilings(paper, table, scale, seeds)
    per_client = bool(t.get("ceiling", {}).get("per_client"))
    groups: dict[str, tuple[tuple, list, list]] = {}  # analog -> (eval args, cells, their training specs)
    # a table with a grid takes each cell's settings before the grid (the scale's own learning rates)
    for r, row in enumerate(table_cells(paper, table, scale, seeds, use_grid=False)):
        for c, cell in enumerate(row):
            if not cell.specs:
                continue
            specs = [training_spec(s) for s in cell.specs]
            part = specs[0]["partition"]
            eval_args = tuple((k, v) for k, v in cell.eval_args if k in ("domain", "structure", "last_rounds")) \
                if t["metric"] in ACCURACY_METRICS else ()
            # a per-client ceiling is evaluated on the clients of a partition: one per partition and weighting
            split = [part, specs[0].get("evaluation", {}).get("weighting", "clients")] if per_client else \
                part if part["scheme"] == "domain" else None
            key = json.dumps([specs[0]["dataset"], split, eval_args], sort_keys=True)
            group = groups.setdefault(key, (eval_args, [], []))
            group[1].append((r, c))
            group[2].extend(specs)
    out = []
    for eval_args, cells, specs in groups.values():
        spec = centralised_spec(specs, t.get("ceiling"))
        for key, value in scale_config(paper, scale).get("ceiling", {}).get("set", {}).items():
            _set_dotted(spec, key, value)  # a centralised paper's ceiling: a larger model or a longer schedule
        dataset = spec["dataset"]
        where = partition_label(spec["partition"]) if per_client else ""
        out.append(Ceiling(dataset["name"], dataset.get("train_limit"), eval_args,
                           tuple({**spec, "seed": s} for s in sorted({x["seed"] for x in specs})), tuple(cells),
                           where))
    return out


def _row_ceilings(paper: dict, table: str, scale: str, seeds=None) -> list[Ceiling]:
    """The ceilings of a table whose `ceiling: {row: <label>}` names one of its rows (a distillation table's
    teacher): per column, that row's runs are the ceiling of the column's other cells (no further run)."""
    t = paper["tables"][table]
    label = t["ceiling"]["row"]
    labels = [r["label"] for r in t["rows"]]
    if label not in labels:
        raise SuiteError(f"papers/{paper['id']}/paper.yaml: table '{table}': ceiling row '{label}' is not one of its "
                         f"rows ({', '.join(labels)})")
    ref = labels.index(label)
    grid = table_cells(paper, table, scale, seeds, use_grid=False)
    out = []
    for c in range(len(t["columns"])):
        top = grid[ref][c]
        if not top.specs:
            continue
        cells = tuple((r, c) for r in range(len(grid)) if r != ref and grid[r][c].specs)
        dataset = training_spec(top.specs[0])["dataset"]
        # the column's metric arguments (its domain: FeSTA's task), read from the ceiling row's runs as from the cells'
        eval_args = tuple((k, v) for k, v in top.eval_args if k in ("domain", "structure", "last_rounds")) \
            if t["metric"] in ACCURACY_METRICS else ()
        out.append(Ceiling(dataset["name"], dataset.get("train_limit"), eval_args,
                           tuple(training_spec(s) for s in top.specs),
                           cells, where=t["columns"][c]["label"]))
    return out


def check_names(spec: dict, where: str) -> None:
    """Fail at planning time, not hours into a workflow, on a dataset, model or method that does not exist."""
    from common.data import known_loaders
    from common.fl import get_algorithm
    from common.models import MODELS
    if is_calibration(spec):
        from common.calibrate import get_calibration
        try:
            get_calibration(spec["calibration"])
        except SuiteError as e:
            raise SuiteError(f"{where}: {e}") from None
        spec = spec["base"]
    loaders = known_loaders()
    if spec["dataset"]["name"] not in loaders:
        raise SuiteError(f"{where}: unknown dataset '{spec['dataset']['name']}'; known: {', '.join(sorted(loaders))}")
    if spec["model"]["name"] not in MODELS:
        raise SuiteError(f"{where}: unknown model '{spec['model']['name']}'; known: {', '.join(sorted(MODELS))}")
    try:
        get_algorithm(spec["method"])
    except SuiteError as e:
        raise SuiteError(f"{where}: {e}") from None


def _paper_specs(paper_name: str, scale: str, seeds=None) -> list[dict]:
    paper = load_paper(paper_name)
    return [spec for table in paper["tables"]
            for cell in itertools.chain.from_iterable(table_cells(paper, table, scale, seeds)) for spec in cell.specs] + \
        [spec for table in paper["tables"] for ceiling in table_ceilings(paper, table, scale, seeds)
         for spec in ceiling.specs]


def paper_runs(paper_name: str, scale: str, seeds=None) -> dict[str, dict]:
    """All training runs (run id -> spec) a paper's report needs at `scale`, the base runs of calibrations included."""
    runs = {}
    for spec in _paper_specs(paper_name, scale, seeds):
        spec = training_spec(spec)
        runs[run_id(spec)] = spec
    for spec in {run_id({**s, "seed": 0}): s for s in runs.values()}.values():
        check_names(spec, f"papers/{paper_name}/paper.yaml (scale {scale})")
    return runs


def paper_calibrations(paper_name: str, scale: str, seeds=None) -> dict[str, dict]:
    """All calibrations (calibration id -> calibration spec) a paper's report needs at `scale`."""
    cals = {run_id(s): s for s in _paper_specs(paper_name, scale, seeds) if is_calibration(s)}
    for spec in {run_id({**s, "base": {**s["base"], "seed": 0}}): s for s in cals.values()}.values():
        check_names(spec, f"papers/{paper_name}/paper.yaml (scale {scale})")
    return cals
