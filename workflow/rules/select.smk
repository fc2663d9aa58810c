# THE checkpoint of an iteration: classify frames (accurate / candidate / failed) per system, pick
# candidates, and decide (converged / next stage / stop) in one step. stats.json is written last.


checkpoint select:
    input:
        summary="results/iter.{it}/explore/summary.json",
        plan="results/iter.{it}/explore/plan.json",
    output:
        stats="results/iter.{it}/select/stats.json",
        candidates=directory("results/iter.{it}/select/candidates"),
    log:
        "logs/iter.{it}/select.log",
    benchmark:
        "benchmarks/iter.{it}/select.tsv"
    conda:
        "../../envs/label.yaml"
    params:
        it=it_int,
    shell:
        "dpsnake select --config results/config.json --iter {params.it}"
        " --explore results/iter.{wildcards.it}/explore --outdir results/iter.{wildcards.it}/select"
        " --data results/data --results results"
        " 2>&1 | tee {log}"
