"""Where the workflow's stages write, relative to its working directory: the one place for
`runs/...` paths (the stage table, the CLI's defaults and the report read them from here)."""

DATA = "data/prepared"
BASE = "runs/base"
# per target device; `${latency.device}` is filled from the params (DVC templating; `resolved` for Snakemake)
LATENCY = "runs/latency/${latency.device}"
POOL = "runs/teacher_pool"
SEARCH = "runs/search"
BASELINE = "runs/baseline"
FINAL = "runs/final"
REPORT = "reports"
REPORT_PLOTS = ("search_trajectory.png", "ap_vs_latency.png", "teacher_pool.png", "student_vs_teacher.png")
