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
        "printf '%s\\n' {params.spec:q} > {output}.tmp && mv {output}.tmp {output}"


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
    shell:
        "{PYTHON} -m common.train {input} {output} --data-root {params.data_root} "
        "--device {params.device} --threads {threads} --checkpoint results/checkpoints/{wildcards.run}.pt"
