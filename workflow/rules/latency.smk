rule profile_latency:
    input:
        STAGES["profile_latency"].deps,
    output:
        stage_outputs("profile_latency"),
    conda:
        "../../envs/jdnas.yaml"
    log:
        "logs/profile_latency.log",
    # the cores it times with; train_base runs beside it (timings keep the fastest call, which
    # other jobs barely move). First among the ready jobs: the search and baseline_nas wait for it
    priority: 50
    threads: PARAMS["latency"]["threads"]
    resources:
        gpu=1 if PARAMS["latency"]["device"] == "cuda" else 0,
    params:
        trigger=STAGES["profile_latency"].params_hash(PARAMS),
    shell:
        stage_shell("profile_latency")
