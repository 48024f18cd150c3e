# The elastic teacher pool: the supernet is trained once (DDP over teacher_pool.train.gpus GPUs
# via torchrun inside this one job when device is cuda), then a sample of members is evaluated.
rule train_teacher_pool:
    input:
        STAGES["train_teacher_pool"].deps,
    output:
        stage_outputs("train_teacher_pool"),
    conda:
        "../../envs/jdnas.yaml"
    log:
        "logs/train_teacher_pool.log",
    threads: STAGES["train_teacher_pool"].threads
    resources:
        gpu=PARAMS["teacher_pool"]["train"]["gpus"] * GPUS_PER_JOB,
    params:
        trigger=STAGES["train_teacher_pool"].params_hash(PARAMS),
    shell:
        stage_shell("train_teacher_pool")


rule eval_teacher_pool:
    input:
        STAGES["eval_teacher_pool"].deps,
    output:
        stage_outputs("eval_teacher_pool"),
    conda:
        "../../envs/jdnas.yaml"
    log:
        "logs/eval_teacher_pool.log",
    threads: STAGES["eval_teacher_pool"].threads
    resources:
        gpu=GPUS_PER_JOB,
    params:
        trigger=STAGES["eval_teacher_pool"].params_hash(PARAMS),
    shell:
        stage_shell("eval_teacher_pool")
