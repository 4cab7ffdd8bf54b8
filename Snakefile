# Entry point: `snakemake -c 2 reports/<paper>.md` trains the runs a paper's report needs and writes the report.
# Scale and other settings: config/config.yaml, overridable with --config (e.g. --config scale=smoke).
import shlex
import sys
from pathlib import Path

from snakemake.utils import min_version, validate

min_version("8.10")

BASE = Path(workflow.basedir)
sys.path.insert(0, str(BASE))

configfile: BASE / "config" / "config.yaml"



def as_typed(value):
    """`--config seeds=[3,4,5]` arrives as the string "[3,4,5]" or as a list of strings: read each as YAML, as
    the user typed it, so the schema sees integers."""
    import yaml
    if isinstance(value, str):
        value = yaml.safe_load(value)
    return [as_typed(v) for v in value] if isinstance(value, list) else value


if "seeds" in config:
    config["seeds"] = as_typed(config["seeds"])
validate(config, BASE / "config" / "schema.yaml")

from common.errors import SuiteError
from common.experiments import confirmations, known_papers, paper_calibrations, paper_runs
from common.results import run_id
from common.data import missing_files
from common.models.text import missing_files as missing_checkpoint_files

SCALE = config["scale"]
SEEDS = config.get("seeds")
PAPERS = known_papers()
PYTHON = f"PYTHONPATH={shlex.quote(str(BASE))} {shlex.quote(sys.executable)}"  # quoted: paths may hold spaces


def runs_of(paper):
    """Run id -> resolved spec for one paper at the configured scale."""
    try:
        return paper_runs(paper, SCALE, SEEDS)
    except SuiteError as e:
        raise WorkflowError(str(e)) from None


RUNS = {rid: spec for paper in PAPERS for rid, spec in runs_of(paper).items()}


def calibrations_of(paper):
    """Calibration id -> calibration spec (post-hoc methods on a base run's final model) for one paper."""
    try:
        return paper_calibrations(paper, SCALE, SEEDS)
    except SuiteError as e:
        raise WorkflowError(str(e)) from None


CALIBRATIONS = {cid: spec for paper in PAPERS for cid, spec in calibrations_of(paper).items()}
# grid cells' best points re-run with the other seeds: name -> (table, row, column, seed)
CONFIRMATIONS = {name: where for paper in PAPERS for name, where in confirmations(paper, SCALE, SEEDS).items()}
BASE_OF = {cid: run_id(spec["base"]) for cid, spec in CALIBRATIONS.items()}  # calibration id -> its base run

wildcard_constraints:
    paper="[a-z0-9_]+",  # paper ids are lower case: reports/README.md is the index, not a paper
    run="[0-9a-f]{12}",
    cal="[0-9a-f]{12}",


include: "workflow/rules/reliability.smk"  # stale locks, corrupt results: before Snakemake plans
include: "workflow/rules/runs.smk"
include: "workflow/rules/calibrate.smk"
include: "workflow/rules/confirm.smk"
include: "workflow/rules/reports.smk"


rule all:
    default_target: True
    input:
        expand("reports/{paper}.md", paper=PAPERS),
        "reports/README.md",
