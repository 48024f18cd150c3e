rule profile_latency:
    input:
        STAGES["profile_latency"].deps,
    output:
        stage_outputs("profile_latency"),
    conda:
        "../../envs/jdnas.yaml"
    log:
        "logs/profile_latency.log",
    # every core: no other job of this run competes with the timings (they use latency.threads)
    threads: workflow.cores
    resources:
        gpu=1 if PARAMS["latency"]["device"].startswith("cuda") else 0,
    params:
        trigger=STAGES["profile_latency"].params_hash(PARAMS),
    shell:
        stage_shell("profile_latency")
