import json

# One training run per resolved spec; the run id is the hash of the spec, so papers share identical runs.
# A run saves a checkpoint every round and, when restarted after a crash, continues from it.


rule spec:
    output:
        "results/specs/{run}.json",
    params:
        spec=lambda wc: json.dumps(RUNS[wc.run], sort_keys=True),
    localrule: True
    # A shell command, not a `run:` block: Snakemake would start a whole new Snakemake process (re-reading every
    # paper.yaml) for each `run:` job, seconds per run. Written to a temporary name first, so it appears whole.
    shell:
        "printf '%s\\n' {params.spec:q} > {output:q}.tmp && mv {output:q}.tmp {output:q}"


rule train:
    input:
        rules.spec.output,
    output:
        "results/runs/{run}.json",
    benchmark:
        "results/benchmarks/{run}.tsv"
    threads: config["threads"]
    resources:
        mem_mb=3000,
    params:
        data_root=config["data_root"],
        device=config["device"],
        checkpoint=lambda wc: f"results/checkpoints/{wc.run}.pt",
    # Every value is quoted (`:q`): a data_root with spaces or shell characters reaches the run as it is.
    shell:
        "{PYTHON} -m common.train {input:q} {output:q} --data-root {params.data_root:q} "
        "--device {params.device:q} --threads {threads} --checkpoint {params.checkpoint:q}"
