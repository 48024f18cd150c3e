rule prepare_data:
    output:
        stage_outputs("prepare_data"),
    conda:
        "../../envs/jdnas.yaml"
    log:
        "logs/prepare_data.log",
    threads: STAGES["prepare_data"].threads
    params:
        trigger=STAGES["prepare_data"].params_hash(PARAMS),
    shell:
        stage_shell("prepare_data")
