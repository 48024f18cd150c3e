rule train_base:
    input:
        STAGES["train_base"].deps,
        # model.checkpoint: the detector it adopts (replacing the file reruns it and what follows)
        [PARAMS["model"]["checkpoint"]] if PARAMS["model"]["checkpoint"] else [],
    output:
        stage_outputs("train_base"),
    conda:
        "../../envs/jdnas.yaml"
    log:
        "logs/train_base.log",
    threads: STAGES["train_base"].threads
    resources:
        gpu=PARAMS["train_base"]["gpus"] * GPUS_PER_JOB,  # DDP over train_base.gpus devices
    params:
        trigger=STAGES["train_base"].params_hash(PARAMS),
    shell:
        stage_shell("train_base")
