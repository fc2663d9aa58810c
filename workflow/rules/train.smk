# One job per model of the ensemble: dp train -> dp freeze -> dp convert-backend -> model.dp.
# Inputs: the iteration's datasets, the previous iteration's model (train.init_from_previous) and the
# pretrained model (train.finetune); `dpsnake train` decides which one it starts from (init.json). A
# continued model also reads the previous folder's out.json and, with train.init_lr_schedule: continue,
# its last checkpoint (model.ckpt*), written by the same job as its model.dp.
# Clusters: give the rule a GPU in the profile (set-resources: train: gpu / gres).


rule train:
    input:
        data=train_data,
        init=train_init,
    output:
        model="results/iter.{it}/train/model.{k}/model.dp",
        lcurve="results/iter.{it}/train/model.{k}/lcurve.out",
    log:
        "logs/iter.{it}/train.{k}.log",
    benchmark:
        "benchmarks/iter.{it}/train.{k}.tsv"
    conda:
        "../../envs/train.yaml"
    threads: CFG["train"]["threads"]
    resources:
        # 0: DeePMD-kit's choice (a GPU if there is one); 1 (profiles/gpu): train on CPU cores, where the
        # small demo model trains faster than as four processes sharing one GPU (docs/benchmarks.md)
        train_on_cpu=0,
    params:
        it=it_int,
        init=train_init_arg,
    shell:
        "dpsnake train --config results/config.json --iter {params.it} --model {wildcards.k}"
        " --outdir results/iter.{wildcards.it}/train/model.{wildcards.k} --data {input.data}"
        " {params.init} --threads {threads} --on-cpu {resources.train_on_cpu} > {log} 2>&1"
        " || {{ rc=$?; tail -n 1 {log} >&2; exit $rc; }}"
