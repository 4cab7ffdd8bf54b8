import re

# A table with a learning-rate grid is tuned on the first seed; `confirm` re-runs each cell's best point with every
# other seed (common/confirm.py). The job is named by cell and seed: which point it trains is read from the tuning
# runs when it starts.


def confirmation_inputs(wc):
    paper = wc.name.split("-")[0]
    table, row, col, _ = CONFIRMATIONS[wc.name]
    from common.experiments import load_paper, table_cells
    cell = table_cells(load_paper(paper), table, SCALE, SEEDS)[row][col]
    return expand("results/runs/{run}.json", run=[r for p in cell.points for r in p.run_ids])


rule confirm:
    input:
        confirmation_inputs,
    output:
        "results/confirmations/{name}.json",
    wildcard_constraints:
        name="|".join(map(re.escape, CONFIRMATIONS)) or "(?!)",
    benchmark:
        "results/benchmarks/confirmations/{name}.tsv"
    threads: config["threads"]
    resources:
        mem_mb=3000,
    params:
        where=lambda wc: [str(x) for x in CONFIRMATIONS[wc.name]],
        paper=lambda wc: wc.name.split("-")[0],
        seeds=["--seeds", *map(str, SEEDS)] if SEEDS else [],
        scale=SCALE,
        data_root=config["data_root"],
        device=config["device"],
    shell:
        "{PYTHON} -m common.confirm {params.paper:q} {params.where:q} --scale {params.scale:q} {params.seeds:q} "
        "--results results/runs --out {output:q} --checkpoints results/checkpoints "
        "--data-root {params.data_root:q} --device {params.device:q} --threads {threads}"
