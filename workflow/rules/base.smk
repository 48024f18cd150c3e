rule train_base:
    input:
        STAGES["train_base"].deps,
    output:
        stage_outputs("train_base"),
    conda:
        "../../envs/jdnas.yaml"
    log:
        "logs/train_base.log",
    # one thread: torch's intra-op threads stall badly when another job shares the cores
    threads: 1
    resources:
        gpu=GPUS_PER_JOB,
    params:
        trigger=STAGES["train_base"].params_hash(PARAMS),
    shell:
        stage_shell("train_base")
