# Reports: one page per iteration, the run-level page, and the final models.
# `snakemake --report report.zip` bundles the pages marked with report().


rule report_iteration:
    input:
        collect="results/iter.{it}/collect/summary.json",
        stats="results/iter.{it}/select/stats.json",
        models=model_files,
    output:
        html=report(
            "results/reports/iter.{it}.html",
            caption="../report/iteration.rst",
            category="Iterations",
            labels={"iteration": "{it}", "page": "report"},
        ),
        csv=report(
            "results/reports/iter.{it}.csv",
            caption="../report/iteration_table.rst",
            category="Iterations",
            labels={"iteration": "{it}", "page": "table (csv)"},
        ),
        json="results/reports/iter.{it}.json",
    log:
        "logs/iter.{it}/report.log",
    benchmark:
        "benchmarks/iter.{it}/report.tsv"
    conda:
        "../../envs/label.yaml"
    params:
        it=it_int,
        accuracy="" if CFG["report"]["accuracy"] else "--no-accuracy",
    shell:
        "dpsnake report --config results/config.json --iter {params.it} {params.accuracy} > {log} 2>&1"
        " || {{ rc=$?; tail -n 1 {log} >&2; exit $rc; }}"


rule finalize:
    input:
        models=final_models,
        stats=final_stats,
    output:
        directory("results/models/final"),
    log:
        "logs/finalize.log",
    benchmark:
        "benchmarks/finalize.tsv"
    conda:
        "../../envs/label.yaml"
    params:
        it=final_iter,
        dirs=final_model_dirs,
    shell:
        "dpsnake finalize --iter {params.it} --stats {input.stats} --models {params.dirs}"
        " --outdir {output} > {log} 2>&1"
        " || {{ rc=$?; tail -n 1 {log} >&2; exit $rc; }}"


rule report_run:
    input:
        iterations=iteration_reports,
        final="results/models/final",
    output:
        html=report(
            "results/reports/index.html",
            caption="../report/run.rst",
            category="Run",
            labels={"page": "run summary"},
        ),
        csv=report(
            "results/reports/run.csv",
            caption="../report/run_table.rst",
            category="Run",
            labels={"page": "run table (csv)"},
        ),
        learning=report(
            "results/reports/learning_curve.csv",
            caption="../report/learning_curve.rst",
            category="Run",
            labels={"page": "learning curve (csv)"},
        ),
        json="results/reports/run.json",
    log:
        "logs/report_run.log",
    benchmark:
        "benchmarks/report_run.tsv"
    conda:
        "../../envs/label.yaml"
    params:
        accuracy="" if CFG["report"]["accuracy"] else "--no-accuracy",
    shell:
        "dpsnake report --config results/config.json --run {params.accuracy} > {log} 2>&1"
        " || {{ rc=$?; tail -n 1 {log} >&2; exit $rc; }}"
