# Joint-DetNAS workflow. Rules are thin: each runs one `jdnas` command defined in jdnas/stages.py
# (the same definitions generate dvc.yaml). Params: params.yaml, overridden by --configfile files.
configfile: "params.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/base.smk"
include: "workflow/rules/latency.smk"
include: "workflow/rules/teacher_pool.smk"
include: "workflow/rules/search.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        stage_outputs("train_base"),
        stage_outputs("profile_latency"),
        stage_outputs("eval_teacher_pool"),
        stage_outputs("evaluate_final"),
        f"{SEARCH}/history.csv",
        stage_outputs("report"),
    default_target: True
