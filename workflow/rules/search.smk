# The joint search as a static DAG: per round, propose (screen every move) -> K finalist jobs ->
# select (paired decision; the winner trains on); then finish (the lineage's schedule to its end).
# R and K come from params, so `snakemake -n` plans the whole search; a round after an early
# stop passes its state through. Round r depends on round r-1 only through its files.
from jdnas.joint.search import finalist_slots
from jdnas.stages import SEARCH, SEARCH_INPUTS, fill, search_step

ROUNDS = PARAMS["search"]["rounds"]
CANDIDATES = finalist_slots(PARAMS["search"])
SEARCH_DEPS = [fill(x, PARAMS) for x in SEARCH_INPUTS]
SEARCH_THREADS = STAGES["search"].threads  # the DVC search stage runs these jobs at the same count


def search_shell(step, r="", k=""):
    return fill(search_step(step, r, k), PARAMS) + " --params " + " --params ".join(PARAM_FILES) + \
        " --threads {threads} > {log} 2>&1"


wildcard_constraints:
    r=r"\d+",
    k=r"\d+",


# the search is the critical path: its jobs go first when other ready jobs (the naive baseline,
# the pool's evaluation) wait for a core
SEARCH_PRIORITY = 5


rule search_init:
    priority: SEARCH_PRIORITY
    input:
        SEARCH_DEPS,
    output:
        f"{SEARCH}/round_0/state.json",
        f"{SEARCH}/round_0/student.pt",
    conda:
        "../../envs/jdnas.yaml"
    log:
        "logs/search/init.log",
    threads: SEARCH_THREADS
    resources:
        gpu=GPUS_PER_JOB,
    params:
        trigger=STAGES["search"].params_hash(PARAMS),
    shell:
        search_shell("init")


rule search_propose:
    priority: SEARCH_PRIORITY
    input:
        SEARCH_DEPS,
        state=lambda w: f"{SEARCH}/round_{int(w.r) - 1}/state.json",
    output:
        f"{SEARCH}/round_{{r}}/proposals.json",
    conda:
        "../../envs/jdnas.yaml"
    log:
        "logs/search/round_{r}/propose.log",
    threads: SEARCH_THREADS
    resources:
        gpu=GPUS_PER_JOB,
    params:
        trigger=STAGES["search"].params_hash(PARAMS),
    shell:
        search_shell("propose", "{wildcards.r}")


rule search_candidate:
    priority: SEARCH_PRIORITY
    input:
        SEARCH_DEPS,
        f"{SEARCH}/round_{{r}}/proposals.json",
        student=lambda w: f"{SEARCH}/round_{int(w.r) - 1}/student.pt",
    output:
        f"{SEARCH}/round_{{r}}/cand_{{k}}/result.json",
    conda:
        "../../envs/jdnas.yaml"
    log:
        "logs/search/round_{r}/cand_{k}.log",
    threads: SEARCH_THREADS
    resources:
        gpu=GPUS_PER_JOB,
    params:
        trigger=STAGES["search"].params_hash(PARAMS),
    shell:
        search_shell("candidate", "{wildcards.r}", "{wildcards.k}")


rule search_select:
    priority: SEARCH_PRIORITY
    input:
        SEARCH_DEPS,
        lambda w: [f"{SEARCH}/round_{w.r}/cand_{k}/result.json" for k in range(CANDIDATES)],
        state=lambda w: f"{SEARCH}/round_{int(w.r) - 1}/state.json",
    output:
        f"{SEARCH}/round_{{r}}/state.json",
        f"{SEARCH}/round_{{r}}/student.pt",
        f"{SEARCH}/round_{{r}}/lineage.pt",
    conda:
        "../../envs/jdnas.yaml"
    log:
        "logs/search/round_{r}/select.log",
    threads: SEARCH_THREADS
    resources:
        gpu=GPUS_PER_JOB,
    params:
        trigger=STAGES["search"].params_hash(PARAMS),
    shell:
        search_shell("select", "{wildcards.r}")


rule search_finish:
    priority: SEARCH_PRIORITY
    input:
        SEARCH_DEPS,
        f"{SEARCH}/round_{ROUNDS}/state.json",
    output:
        f"{SEARCH}/finish/state.json",
        f"{SEARCH}/finish/student.pt",
        f"{SEARCH}/finish/result.json",
    conda:
        "../../envs/jdnas.yaml"
    log:
        "logs/search/finish.log",
    threads: SEARCH_THREADS
    resources:
        gpu=GPUS_PER_JOB,
    params:
        trigger=STAGES["search"].params_hash(PARAMS),
    shell:
        search_shell("finish")


rule search_history:
    input:
        [f"{SEARCH}/round_{r}/state.json" for r in range(1, ROUNDS + 1)],
        f"{SEARCH}/finish/result.json",
    output:
        f"{SEARCH}/history.csv",
        f"{SEARCH}/summary.json",
    conda:
        "../../envs/jdnas.yaml"
    log:
        "logs/search/history.log",
    threads: SEARCH_THREADS
    shell:
        search_shell("history")


rule evaluate_final:
    input:
        stage_inputs("evaluate_final"),
    output:
        stage_outputs("evaluate_final"),
    conda:
        "../../envs/jdnas.yaml"
    log:
        "logs/evaluate_final.log",
    threads: STAGES["evaluate_final"].threads
    resources:
        gpu=GPUS_PER_JOB,
    params:
        trigger=STAGES["evaluate_final"].params_hash(PARAMS),
    shell:
        stage_shell("evaluate_final")
