# This iteration's labels -> results/data/iter.N/<system> (deepmd/npy + provenance.csv), and
# collect/summary.json. Stops with a message when too many labels failed.


rule collect:
    input:
        stats="results/iter.{it}/select/stats.json",
        labels=label_outputs,
    output:
        data=directory("results/data/iter.{it}"),
        summary="results/iter.{it}/collect/summary.json",
    log:
        "logs/iter.{it}/collect.log",
    benchmark:
        "benchmarks/iter.{it}/collect.tsv"
    conda:
        "../../envs/label.yaml"
    params:
        it=it_int,
    shell:
        "dpsnake collect --config results/config.json --iter {params.it} --stats {input.stats}"
        " --labels {input.labels} --data-out {output.data} --summary {output.summary} > {log} 2>&1"
        " || {{ rc=$?; tail -n 1 {log} >&2; exit $rc; }}"
