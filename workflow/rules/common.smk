# Shared helpers: validated params and the stage table from jdnas.stages.
import os
import shlex
import sys

from jdnas.config import defaults, load_params, merge, resolve_checkpoint
from jdnas.errors import JdnasError
from jdnas.stages import STAGES

# Rules run the `jdnas` of the environment Snakemake runs in, whatever the shell's PATH says.
shell.prefix(f"set -euo pipefail; export PATH={shlex.quote(os.path.dirname(sys.executable))}:\"$PATH\"; ")

# params.yaml first, then every --configfile in order: later files override earlier ones.
# The jdnas commands read these files themselves, so the run is the same under DVC.
PARAM_FILES = ["params.yaml"] + [str(f) for f in (workflow.overwrite_configfiles or [])]
try:
    PARAMS = load_params(PARAM_FILES)
    merged = merge(defaults(), config, source="snakemake config")
    resolve_checkpoint(merged, "snakemake config")  # as load_params does
    if merged != PARAMS:
        raise JdnasError("--config overrides do not reach the jdnas commands: put them in a YAML file "
                         "and pass --configfile FILE")
except JdnasError as e:
    raise WorkflowError(f"jdnas: error: {e}")


def stage_inputs(name):
    """A stage's data inputs, with params filled in."""
    return list(STAGES[name].resolved(PARAMS).deps)


def stage_outputs(name):
    """Every output of a stage: folders as directory(), then files and metrics."""
    s = STAGES[name].resolved(PARAMS)
    return [directory(d) for d in s.dir_outs] + list(s.outs) + list(s.metrics)


def stage_shell(name):
    """The stage's jdnas command with this run's params files; logs go to {log}."""
    return STAGES[name].resolved(PARAMS).shell(PARAM_FILES, "{threads}") + " > {log} 2>&1"


# GPU jobs ask Snakemake for one of --resources gpu=N; the job itself leases a free device id
# (jdnas.engine.gpu). JDNAS_GPUS lists the ids jobs may lease (tests use fake ids on CPU).
# `device: cuda:N` pins every job to device N: nothing to count or lease.
GPUS_PER_JOB = 1 if PARAMS["device"] == "cuda" or os.environ.get("JDNAS_GPUS") else 0
