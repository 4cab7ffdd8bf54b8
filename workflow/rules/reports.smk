# A paper's report needs all of its runs at the configured scale.


def report_runs(wc):
    if wc.paper not in PAPERS:
        raise WorkflowError(f"unknown paper '{wc.paper}'; known papers: {', '.join(PAPERS)}")
    runs = runs_of(wc.paper)
    if SCALE == "paper":
        missing = sorted({m for spec in runs.values()
                          for m in missing_files(spec["dataset"]["name"], config["data_root"])
                          + missing_checkpoint_files(spec["model"], config["data_root"])})
        if missing:
            raise WorkflowError(f"paper scale needs dataset files that are not in data_root "
                                f"'{config['data_root']}':\n  " + "\n  ".join(missing) +
                                "\nSee README.md, 'Paper scale', for how to obtain them.")
    return expand("results/runs/{run}.json", run=sorted(runs))


def report_calibrations(wc):
    return expand("results/calibrations/{cal}.json", cal=sorted(calibrations_of(wc.paper)))


def report_confirmations(wc):
    return expand("results/confirmations/{name}.json", name=sorted(confirmations(wc.paper, SCALE, SEEDS)))


rule report:
    input:
        runs=report_runs,
        calibrations=report_calibrations,
        confirmations=report_confirmations,
        paper=BASE / "papers" / "{paper}" / "paper.yaml",
    output:
        md="reports/{paper}.md",
        json="reports/{paper}.json",  # the report as data, for citations and leaderboards
    params:
        seeds=["--seeds", *map(str, SEEDS)] if SEEDS else [],
        data_root=config["data_root"],
        scale=SCALE,
    localrule: True
    # Every value is quoted (`:q`, a list item by item): a data_root with spaces or shell characters arrives as it is.
    shell:
        "{PYTHON} -m common.report.build {wildcards.paper:q} --scale {params.scale:q} {params.seeds:q} "
        "--results results/runs --calibrations results/calibrations --out {output.md:q} --figures reports/figures "
        "--data-root {params.data_root:q}"


rule index:
    input:
        expand("reports/{paper}.json", paper=PAPERS),
    output:
        "reports/README.md",
    localrule: True
    shell:
        "{PYTHON} -m common.report.index --reports reports --out {output:q}"
