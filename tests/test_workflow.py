"""End to end: `snakemake reports/feddf.md` at smoke scale, its reproducibility, and clear workflow errors."""
import functools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from common.train import execute
from common.expected import EXPECTED_DIR, collect, cpu_kind, diff, expected_path
from common.experiments import known_papers, load_paper, paper_runs, table_cells
from common.results import repeatable_part

REPO = Path(__file__).resolve().parent.parent


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--cores", "2",
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=1200)



@functools.cache
def repeated_runs() -> dict[str, list[str]]:
    """The runs the second build trains again, by paper: each paper's first smoke run (by id: its data and model in
    new processes) and, for every algorithm, the first run (papers in order) that uses it, unless one is chosen."""
    papers = {paper: sorted(paper_runs(paper, "smoke").items()) for paper in known_papers()}
    chosen = {paper: [runs[0][0]] for paper, runs in papers.items()}
    covered = {runs[0][1]["method"]["name"] for runs in papers.values()}
    for paper, runs in papers.items():
        for rid, spec in runs:
            if spec["method"]["name"] not in covered:
                covered.add(spec["method"]["name"])
                chosen[paper].append(rid)
    return chosen


@pytest.fixture(scope="module")
def smoke_builds(tmp_path_factory):
    """Every paper's smoke-scale report built from scratch; then, from scratch in a second folder, one run of every
    paper and of every algorithm (`repeated_runs`: each again in new processes; the whole set twice would double the
    test time); then the first folder's reports built again from its runs, the earlier ones kept in `reports-before`."""
    first, second = (tmp_path_factory.mktemp(f"smoke{i}") for i in range(2))
    proc = snakemake(first, "all", "--config", "scale=smoke")
    assert proc.returncode == 0, proc.stderr[-3000:]
    targets = sorted({f"results/runs/{rid}.json" for rids in repeated_runs().values() for rid in rids})
    proc = snakemake(second, *targets, "--config", "scale=smoke")
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.copytree(first / "reports", first / "reports-before")
    proc = snakemake(first, "all", "--config", "scale=smoke")  # the default profile forces the report rule
    assert proc.returncode == 0, proc.stderr[-3000:]
    return first, second


@pytest.mark.slow
@pytest.mark.parametrize("paper", known_papers())
def test_smoke_report_is_built_from_every_run(smoke_builds, paper):
    d = smoke_builds[0]
    runs = paper_runs(paper, "smoke")
    assert set(runs) <= {p.stem for p in (d / "results" / "runs").glob("*.json")}
    report = (d / "reports" / f"{paper}.md").read_text()
    meta = load_paper(paper)
    for table in meta["tables"].values():
        assert table["title"] in report
    claims = report.split("## Claims")[1].split("\n## ")[0]
    for claim in meta["claims"]:
        line = next(l for l in claims.splitlines() if l.startswith(f"| {claim['text']}"))
        assert re.match(r"\s*(✅|❌|≈|➖) ", line.split("|")[-2]), line
    for plot in meta.get("plots", []) + ([meta["samples"]] if "samples" in meta else []):
        figure = f"figures/{paper}_{plot['name']}.png"
        if "table" in plot and not any(c.specs for row in table_cells(meta, plot["table"], "smoke") for c in row):
            assert figure not in report  # a plot of a table that does not run at this scale is left out
            continue
        assert figure in report and (d / "reports" / figure).stat().st_size > 10_000
    for rid in runs:
        assert (d / "results" / "benchmarks" / f"{rid}.tsv").is_file()
        res = json.loads((d / "results" / "runs" / f"{rid}.json").read_text())
        assert res["spec"] == runs[rid] and res["data"]["test_samples_in_train"] == 0
        assert res["status"] != "completed" or len(res["metrics"]["test_accuracy"]) == runs[rid]["training"]["rounds"]


@pytest.mark.slow
@pytest.mark.parametrize("paper", known_papers())
def test_report_twin_agrees_with_the_markdown(smoke_builds, paper):
    """reports/<paper>.json carries the same verdicts and cell values as the markdown it was built with."""
    from common.report.build import table_decimals
    from common.report.claims import MARKS
    d = smoke_builds[0]
    report = (d / "reports" / f"{paper}.md").read_text()
    twin = json.loads((d / "reports" / f"{paper}.json").read_text())
    claims = report.split("## Claims")[1].split("\n## ")[0]
    for claim in twin["claims"]:
        line = next(l for l in claims.splitlines() if l.startswith(f"| {claim['text']}"))
        assert line.split("|")[-2].strip().startswith(f"{MARKS[claim['outcome']]} {claim['outcome']}: "), line
        assert line.split("|")[-3].strip() == MARKS[claim["paper_outcome"]]
    tables = report.split("## Claims")[0]
    for key, table in twin["tables"].items():
        ours = tables.split(table["title"])[1].split("**Ours")[1].split("\n\n_")[0]
        decimals = table_decimals(load_paper(paper)["tables"][key])
        for cell in table["cells"]:
            v = cell["ours"]
            if v["mean"] is not None and not v["censored"]:
                line = next(l for l in ours.splitlines() if l.startswith(f"| {cell['our_row']} |"))
                assert f"{v['mean']:.{decimals}f}" in line, (cell, line)
        for ceiling in table["ceilings"]:
            assert ceiling["analog"] in tables.split(table["title"])[1]
    assert set(twin["provenance"]["runs"]) == set(paper_runs(paper, "smoke"))
    assert twin["seeds"] == load_paper(paper)["scales"]["smoke"]["seeds"]


@pytest.mark.slow
def test_suite_index_lists_every_paper_with_its_verdict_counts(smoke_builds):
    index = (smoke_builds[0] / "reports" / "README.md").read_text()
    for paper in known_papers():
        twin = json.loads((smoke_builds[0] / "reports" / f"{paper}.json").read_text())
        line = next(l for l in index.splitlines() if f"[{paper}.md]({paper}.md)" in l)
        held = sum(c["outcome"] == "holds" for c in twin["claims"])
        assert "`smoke`" in line and f"✅ {held} " in line, line


def test_seeds_given_on_the_command_line_as_a_user_types_them(tmp_path):
    proc = snakemake(tmp_path, "-n", "reports/moon.md", "--config", "scale=smoke", "seeds=[3,4,5]")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-2000:]
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", proc.stdout + proc.stderr, flags=re.M))
    runs = paper_runs("moon", "smoke", [3, 4, 5])
    assert {s["seed"] for s in runs.values()} == {3, 4, 5}
    assert int(jobs.get("train", 0)) + int(jobs.get("train_model", 0)) == len(runs)
    bad = snakemake(tmp_path, "-n", "reports/moon.md", "--config", "scale=smoke", "seeds=[3,x]")
    assert bad.returncode != 0 and "seeds" in bad.stdout + bad.stderr


@pytest.mark.slow
@pytest.mark.parametrize("paper", known_papers())
def test_smoke_results_are_bit_identical_across_two_builds(smoke_builds, paper):
    for rid in repeated_runs()[paper]:
        a, b = (json.loads((d / "results" / "runs" / f"{rid}.json").read_text()) for d in smoke_builds)
        assert repeatable_part(a) == repeatable_part(b), rid
    first = smoke_builds[0]
    tables = [(first / folder / f"{paper}.md").read_text().split("## Provenance")[0]
              for folder in ("reports-before", "reports")]
    assert tables[0] == tables[1]


@pytest.mark.slow
@pytest.mark.parametrize("paper", known_papers())
def test_smoke_metrics_match_the_committed_expected_values(smoke_builds, paper):
    """Any change of a smoke-scale number fails here; `make expected` refreshes after an intended change."""
    recorded = sorted(d.name for d in EXPECTED_DIR.iterdir() if d.is_dir())
    assert expected_path(paper).exists(), (f"no expected smoke metrics for this CPU kind ({cpu_kind()}; "
                                           f"recorded: {', '.join(recorded)}): `make expected` records them")
    expected = json.loads(expected_path(paper).read_text())
    differences = diff(paper, expected, collect(paper, smoke_builds[0] / "results" / "runs"))
    assert not differences, "smoke metrics changed (run `make expected` if intended):\n" + "\n".join(differences)


@pytest.mark.slow
@pytest.mark.parametrize("paper", known_papers())
def test_another_seed_gives_other_numbers(smoke_builds, paper):
    rid, spec = sorted(paper_runs(paper, "smoke").items())[0]
    seed0 = json.loads((smoke_builds[0] / "results" / "runs" / f"{rid}.json").read_text())
    seed1 = execute({**spec, "seed": spec["seed"] + 1}, progress=False)
    # every logged metric, not only the training loss: a baseline may train nothing (TDGAN's real-data segmenter)
    assert repeatable_part(seed1["metrics"]) != repeatable_part(seed0["metrics"])


@pytest.mark.slow
def test_up_to_date_workflow_retrains_nothing(smoke_builds):
    """A second build only rebuilds the reports (the default profile forces the report rule), never a run."""
    proc = snakemake(smoke_builds[0], "-n", "all", "--config", "scale=smoke")
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", proc.stdout + proc.stderr, flags=re.M))
    assert proc.returncode == 0 and jobs.get("report") == str(len(known_papers()))
    assert not {"spec", "train", "train_model", "calibrate"} & set(jobs), jobs


def test_unknown_paper_is_one_clear_error(tmp_path):
    proc = snakemake(tmp_path, "-n", "reports/nope.md")
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "unknown paper 'nope'; known papers: " in out and "feddf" in out


def test_unknown_scale_is_one_clear_error(tmp_path):
    proc = snakemake(tmp_path, "-n", "reports/feddf.md", "--config", "scale=huge")
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "'huge' is not one of ['smoke', 'mini', 'paper']" in out


@pytest.mark.parametrize("paper,expected_files", [
    ("feddf", ["cifar-10-batches-py/data_batch_1", "cifar-100-python/train"]),
    ("fedbn", ["MNIST_M/partitions/train_part0.pkl", "office_caltech_10/amazon/back_pack/",
               "domainnet/sketch/zebra/"]),
    ("moon", ["cifar-100-python/train", "tiny-imagenet-200/wnids.txt", "tiny-imagenet-200/val/images/"]),
    ("ccvr", ["cifar-10-batches-py/data_batch_1", "cinic-10/train/airplane/", "cinic-10/test/truck/"]),
    ("graddrop", ["MNIST/raw/train-images-idx3-ubyte", "MNIST/raw/t10k-labels-idx1-ubyte"]),
    ("dosfl", ["MNIST/raw/train-images-idx3-ubyte"]),
    ("feddg", ["Fundus/client1/data_npy/*.npy", "Fundus/client4/data_npy/*.npy", "Prostate/ISBI_1.5/*.npy",
               "Prostate/HK/*.npy"]),
    ("prompt_tuning", ["super_glue/BoolQ/train.jsonl", "t5-v1_1-lm-adapt/small/config.json",
                       "t5-v1_1-lm-adapt/xxl/config.json"]),
    ("mraa", ["taichi-png/train/", "TED384-v2/test/", "vox-png/train/", "moving-gif/test/"]),
    ("beyond_sharing", ["MNIST/raw/train-images-idx3-ubyte", "usps/usps.bz2", "office31/amazon/images/back_pack/",
                        "office31/webcam/images/trash_can/"]),
    ("kd_svd", ["cifar-100-python/train"]),
    ("fedgen", ["MNIST/raw/train-images-idx3-ubyte", "EMNIST/raw/emnist-letters-train-images-idx3-ubyte",
                "celeba-smiling/train/smiling/"]),
    ("fedreid", ["reid/Market/pytorch/train_all/", "reid/ilids/pytorch/train_all/", "reid/cuhk02/pytorch/train_all/"]),
    ("fedgkt", ["cifar-10-batches-py/data_batch_1", "cifar-100-python/train", "cinic-10/train/airplane/",
                "cinic-10/test/truck/"]),
    ("fedkd", ["MIND/train/news.tsv", "MIND/dev/news.tsv", "smm4h_adr/train.tsv", "unilm-base/config.json"]),
    ("fedalign", ["cifar-10-batches-py/data_batch_1", "tiny-imagenet-200/wnids.txt"]),
    ("festa", ["festa_cxr/classification/train/<class>/*.png", "festa_cxr/detection/test/boxes.csv",
               "festa_cxr/segmentation/train/masks/*.png"]),
])
def test_missing_paper_scale_data_is_one_clear_error(tmp_path, paper, expected_files):
    proc = snakemake(tmp_path, "-n", f"reports/{paper}.md", "--config", "scale=paper",
                     f"data_root={tmp_path / 'none'}")
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "paper scale needs dataset files that are not in data_root" in out
    assert all(f in out for f in expected_files), out[-2000:]
    assert not (tmp_path / "results").exists()
