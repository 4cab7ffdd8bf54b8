# One training run per resolved spec; the run id is the hash of the spec, so papers share identical runs.
# A run saves a checkpoint every round and, when restarted after a crash, continues from it.


rule spec:
    output:
        "results/specs/{run}.json",
    params:
        spec=lambda wc: RUNS[wc.run],
    localrule: True
    run:
        from common.results import write_json_atomic

        write_json_atomic(output[0], params.spec)


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
