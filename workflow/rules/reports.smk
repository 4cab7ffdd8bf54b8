# A paper's report needs all of its runs at the configured scale.


def report_runs(wc):
    if wc.paper not in PAPERS:
        raise WorkflowError(f"unknown paper '{wc.paper}'; known papers: {', '.join(PAPERS)}")
    runs = runs_of(wc.paper)
    if SCALE == "paper":
        missing = sorted({m for spec in runs.values()
                          for m in missing_files(spec["dataset"]["name"], config["data_root"])})
        if missing:
            raise WorkflowError(f"paper scale needs dataset files that are not in data_root "
                                f"'{config['data_root']}':\n  " + "\n  ".join(missing) +
                                "\nSee README.md, 'Paper scale', for how to obtain them.")
    return expand("results/runs/{run}.json", run=sorted(runs))


def report_calibrations(wc):
    return expand("results/calibrations/{cal}.json", cal=sorted(calibrations_of(wc.paper)))


rule report:
    input:
        runs=report_runs,
        calibrations=report_calibrations,
        paper=BASE / "papers" / "{paper}" / "paper.yaml",
    output:
        "reports/{paper}.md",
    params:
        seeds=f"--seeds {' '.join(map(str, SEEDS))}" if SEEDS else "",
        data_root=config["data_root"],
    localrule: True
    shell:
        "{PYTHON} -m common.report.build {wildcards.paper} --scale {SCALE} {params.seeds} "
        "--results results/runs --calibrations results/calibrations --out {output} --figures reports/figures --data-root {params.data_root}"
