import json
import re

# Post-hoc methods (e.g. CCVR's classifier calibration) on the final model of an already-trained run.
#
# Only the base runs of calibrations keep their final model: `train_model` trains them exactly like `train` (same
# command, same results file) and also writes results/models/<run>.pt. Other runs are left to `train`, so results
# built before calibrations existed stay valid. A calibration is named by the hash of its spec (base run's spec +
# calibration settings); `calibrate` reads the base run's final model, spec and results and writes
# results/calibrations/<id>.json atomically, with provenance.

BASE_RUNS = sorted(set(BASE_OF.values()))

ruleorder: train_model > train


rule train_model:
    input:
        rules.spec.output,
    output:
        run="results/runs/{run}.json",
        model="results/models/{run}.pt",
    wildcard_constraints:
        run="|".join(map(re.escape, BASE_RUNS)) or "(?!)",
    benchmark:
        "results/benchmarks/{run}.tsv"
    threads: config["threads"]
    resources:
        mem_mb=3000,
    params:
        data_root=config["data_root"],
        device=config["device"],
        checkpoint=lambda wc: f"results/checkpoints/{wc.run}.pt",
    shell:
        "{PYTHON} -m common.train {input:q} {output.run:q} --data-root {params.data_root:q} "
        "--device {params.device:q} --threads {threads} --checkpoint {params.checkpoint:q} "
        "--model-out {output.model:q}"


rule calibration_spec:
    output:
        "results/calibrations/{cal}.spec.json",
    params:
        spec=lambda wc: json.dumps(CALIBRATIONS[wc.cal], sort_keys=True),
    localrule: True
    shell:
        "printf '%s\\n' {params.spec:q} > {output:q}.tmp && mv {output:q}.tmp {output:q}"


rule calibrate:
    input:
        spec="results/calibrations/{cal}.spec.json",
        base_spec=lambda wc: f"results/specs/{BASE_OF[wc.cal]}.json",
        base_run=lambda wc: f"results/runs/{BASE_OF[wc.cal]}.json",
        model=lambda wc: f"results/models/{BASE_OF[wc.cal]}.pt",
    output:
        "results/calibrations/{cal}.json",
    benchmark:
        "results/benchmarks/calibrations/{cal}.tsv"
    threads: config["threads"]
    resources:
        mem_mb=3000,
    params:
        data_root=config["data_root"],
        device=config["device"],
    shell:
        "{PYTHON} -m common.calibrate {input.spec:q} {input.model:q} {input.base_run:q} {output:q} "
        "--data-root {params.data_root:q} --device {params.device:q} --threads {threads}"
