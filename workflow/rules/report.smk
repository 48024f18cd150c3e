# The naive NAS -> retrain -> prune -> KD pipeline (a budget of its own, from params), the
# baselines matched to the search's compute (control, prune_kd), then the report that puts
# them beside the joint search.
from jdnas.stages import CONTROL_STABLE, NAIVE_NAS, REPORT, REPORT_PLOTS


rule baseline_nas:
    input:
        stage_inputs("baseline_nas"),
    output:
        # the last step's metrics: the finished steps beside it are what a killed run resumes from
        NAIVE_NAS,
    conda:
        "../../envs/jdnas.yaml"
    log:
        "logs/baseline_nas.log",
    threads: STAGES["baseline_nas"].threads
    resources:
        gpu=GPUS_PER_JOB,
    params:
        trigger=STAGES["baseline_nas"].params_hash(PARAMS),
    shell:
        stage_shell("baseline_nas")


rule baseline_naive:
    input:
        stage_inputs("baseline_naive"),
    output:
        # only the metrics: Snakemake would delete a declared steps/ folder before a rerun, and the
        # finished steps in it are what a killed run resumes from
        STAGES["baseline_naive"].metrics,
    conda:
        "../../envs/jdnas.yaml"
    log:
        "logs/baseline_naive.log",
    threads: STAGES["baseline_naive"].threads
    resources:
        gpu=GPUS_PER_JOB,
    params:
        trigger=STAGES["baseline_naive"].params_hash(PARAMS),
    shell:
        stage_shell("baseline_naive")


rule control_stable:
    # the control's first step, on the pool's compute: beside the search (which goes first), before
    # the naive pipeline's last steps
    priority: 4
    input:
        stage_inputs("control_stable"),
    output:
        # the step's metrics: its model and plan beside them are what the control stage continues from
        CONTROL_STABLE,
    conda:
        "../../envs/jdnas.yaml"
    log:
        "logs/control_stable.log",
    threads: STAGES["control_stable"].threads
    resources:
        gpu=GPUS_PER_JOB,
    params:
        trigger=STAGES["control_stable"].params_hash(PARAMS),
    shell:
        stage_shell("control_stable")


rule control:
    # the longest jobs once the search is done (this one and prune_kd): first to start
    priority: 10
    input:
        stage_inputs("control"),
    output:
        # only the summary: the finished steps beside it are what a killed run resumes from
        STAGES["control"].resolved(PARAMS).metrics,
    conda:
        "../../envs/jdnas.yaml"
    log:
        "logs/control.log",
    threads: STAGES["control"].threads
    resources:
        gpu=GPUS_PER_JOB,
    params:
        trigger=STAGES["control"].params_hash(PARAMS),
    shell:
        stage_shell("control")


rule prune_kd:
    priority: 10
    input:
        stage_inputs("prune_kd"),
    output:
        # only the summary: the finished steps beside it are what a killed run resumes from
        STAGES["prune_kd"].resolved(PARAMS).metrics,
    conda:
        "../../envs/jdnas.yaml"
    log:
        "logs/prune_kd.log",
    threads: STAGES["prune_kd"].threads
    resources:
        gpu=GPUS_PER_JOB,
    params:
        trigger=STAGES["prune_kd"].params_hash(PARAMS),
    shell:
        stage_shell("prune_kd")


rule report:
    input:
        stage_inputs("report"),
        [f"{SEARCH}/round_{r}/state.json" for r in range(PARAMS["search"]["rounds"] + 1)],
    output:
        report(f"{REPORT}/report.md", category="Report"),
        report(f"{REPORT}/summary.csv", category="Report"),
        [report(f"{REPORT}/{p}", category="Plots") for p in REPORT_PLOTS],
    conda:
        "../../envs/jdnas.yaml"
    log:
        "logs/report.log",
    threads: STAGES["report"].threads
    resources:
        gpu=GPUS_PER_JOB,  # it times every row's model on the run's device
    params:
        trigger=STAGES["report"].params_hash(PARAMS),
    shell:
        stage_shell("report")
