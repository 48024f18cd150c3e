rule profile_latency:
    input:
        STAGES["profile_latency"].deps,
    output:
        stage_outputs("profile_latency"),
    conda:
        "../../envs/jdnas.yaml"
    log:
        "logs/profile_latency.log",
    # every core (no other job disturbs the timings): Snakemake lowers a rule's threads to --cores;
    # first among the ready jobs, so it does not wait behind the training jobs
    priority: 50
    threads: 1024
    resources:
        gpu=1 if PARAMS["latency"]["device"] == "cuda" else 0,
    params:
        trigger=STAGES["profile_latency"].params_hash(PARAMS),
    shell:
        stage_shell("profile_latency")
