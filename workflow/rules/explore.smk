# The iteration's walkers (stage of the exploration plan x systems x temperatures x pressures x
# replicas), then ONE batched exploration job (GPU on clusters) on the built-in engine or on DeePMD-kit's
# own PyTorch models (explore.engine; the choice and its reason land in explore/engine.json).
# With explore.shards other than 1, plan splits the walkers by cost into shards.json (a checkpoint: the
# number of shards is known once it ran), one explore_shard job per shard (one GPU each), and
# explore_merge joins them into the same summary.json as one job writes.
# explore.warmup: while iteration 0 trains, explore_warmup compiles the GPU kernels (untrained model);
# with explore.compile (DPA-3) also torch.compile's graphs, into results/cache/torchinductor.
# The structure files of the stage are inputs of plan until the iteration's selection ran: an edited
# file replans (and so re-explores) an unfinished iteration (common.smk: plan_structures).


checkpoint plan:
    input:
        prev=prev_stats,
        structures=plan_structures,
    output:
        walkers="results/iter.{it}/explore/walkers.json",
        plan="results/iter.{it}/explore/plan.json",
        shards="results/iter.{it}/explore/shards.json",
    log:
        "logs/iter.{it}/plan.log",
    benchmark:
        "benchmarks/iter.{it}/plan.tsv"
    conda:
        "../../envs/label.yaml"
    params:
        it=it_int,
        prev=prev_stats_arg,
    shell:
        "dpsnake plan --config results/config.json --iter {params.it} {params.prev}"
        " --out {output.walkers} > {log} 2>&1"
        " || {{ rc=$?; tail -n 1 {log} >&2; exit $rc; }}"


# explore.warmup: iteration 0's exploration waits for it (warmup_input); it runs while iteration 0 trains
rule explore_warmup:
    input:
        walkers="results/iter.{it}/explore/walkers.json",
        data=compress_data,
    output:
        "results/iter.{it}/explore/warmup.json",
    log:
        "logs/iter.{it}/explore.warmup.log",
    benchmark:
        "benchmarks/iter.{it}/explore.warmup.tsv"
    conda:
        "../../envs/explore.yaml"
    params:
        engine=CFG["explore"]["engine"],
        device=CFG["explore"]["device"],
        precision=CFG["explore"]["precision"],
        tf32="--tf32" if CFG["explore"]["tf32"] else "",
        compile=COMPILE_ARGS,
        compress=compress_arg,
    shell:
        "dpsnake explore-warmup --config results/config.json --walkers {input.walkers} --out {output}"
        " --engine {params.engine} --device {params.device} --precision {params.precision} {params.tf32}"
        " {params.compile} {params.compress} > {log} 2>&1"
        " || {{ rc=$?; tail -n 1 {log} >&2; exit $rc; }}"


if SHARDED:

    rule explore_shard:
        input:
            models=model_files,
            walkers="results/iter.{it}/explore/walkers.json",
            shards="results/iter.{it}/explore/shards.json",
            data=compress_data,
            warmup=warmup_input,
        output:
            summary="results/iter.{it}/explore/shards/shard.{shard}/summary.json",
        log:
            "logs/iter.{it}/explore.shard.{shard}.log",
        benchmark:
            "benchmarks/iter.{it}/explore.shard.{shard}.tsv"
        conda:
            "../../envs/explore.yaml"
        threads: CFG["explore"]["threads"]
        resources:
            # a workstation's GPUs: `resources: [gpu_jobs=N]` (profiles/gpu: 1) runs N shards at once
            gpu_jobs=1,
        params:
            engine=CFG["explore"]["engine"],
            device=CFG["explore"]["device"],
            precision=CFG["explore"]["precision"],
            tf32="--tf32" if CFG["explore"]["tf32"] else "",
            compile=COMPILE_ARGS,
            compress=compress_arg,
        shell:
            "OMP_NUM_THREADS={threads} dpsnake explore --models {input.models} --walkers {input.walkers}"
            " --shard {wildcards.shard} --shards-file {input.shards}"
            " --outdir results/iter.{wildcards.it}/explore --engine {params.engine} --device {params.device}"
            " --precision {params.precision} {params.tf32} {params.compile} {params.compress} --no-progress"
            " > {log} 2>&1"
            " || {{ rc=$?; tail -n 1 {log} >&2; exit $rc; }}"

    rule explore_merge:
        input:
            walkers="results/iter.{it}/explore/walkers.json",
            shards="results/iter.{it}/explore/shards.json",
            summaries=shard_summaries,
        output:
            summary="results/iter.{it}/explore/summary.json",
        log:
            "logs/iter.{it}/explore.merge.log",
        benchmark:
            "benchmarks/iter.{it}/explore.merge.tsv"
        localrule: True
        conda:
            "../../envs/label.yaml"
        shell:
            "dpsnake merge-shards --walkers {input.walkers} --shards-file {input.shards}"
            " --outdir results/iter.{wildcards.it}/explore > {log} 2>&1"
            " || {{ rc=$?; tail -n 1 {log} >&2; exit $rc; }}"

else:

    rule explore:
        input:
            models=model_files,
            walkers="results/iter.{it}/explore/walkers.json",
            data=compress_data,
            warmup=warmup_input,
        output:
            summary="results/iter.{it}/explore/summary.json",
        log:
            "logs/iter.{it}/explore.log",
        benchmark:
            "benchmarks/iter.{it}/explore.tsv"
        conda:
            "../../envs/explore.yaml"
        threads: CFG["explore"]["threads"]
        params:
            engine=CFG["explore"]["engine"],
            device=CFG["explore"]["device"],
            precision=CFG["explore"]["precision"],
            tf32="--tf32" if CFG["explore"]["tf32"] else "",
            compile=COMPILE_ARGS,
            compress=compress_arg,
        shell:
            "OMP_NUM_THREADS={threads} dpsnake explore --models {input.models} --walkers {input.walkers}"
            " --outdir results/iter.{wildcards.it}/explore --engine {params.engine} --device {params.device}"
            " --precision {params.precision} {params.tf32} {params.compile} {params.compress} --no-progress"
            " > {log} 2>&1"
            " || {{ rc=$?; tail -n 1 {log} >&2; exit $rc; }}"
