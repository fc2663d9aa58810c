# One job per selected candidate; on clusters the SLURM profile groups them (docs/slurm.md: grouping).
# A failed label is written with label_ok=False (+ task.N.failed.json) and never enters the data.
# When a `dpsnake` command fails, the last line of its log is the cause (`dpsnake <cmd>: error: ...`):
# the rules of init_data, plan, explore, train, label, collect and report also print it to Snakemake's error
# output (`|| { tail ... }`).


rule label:
    input:
        label_inputs,
    output:
        "results/iter.{it}/label/task.{task}.extxyz",
    log:
        "logs/iter.{it}/label.{task}.log",
    benchmark:
        "benchmarks/iter.{it}/label.{task}.tsv"
    conda:
        "../../envs/label.yaml"
    shell:
        "dpsnake label --config results/config.json --input {input} --output {output} > {log} 2>&1"
        " || {{ rc=$?; tail -n 1 {log} >&2; exit $rc; }}"
