from jdnas.config import user_data
from jdnas.data.prepare import user_data_fingerprint


rule prepare_data:
    # the user's annotation files and image folders (COCO source): editing them reruns what depends on them
    input:
        [str(p) for p in user_data(PARAMS)],
    output:
        stage_outputs("prepare_data"),
    conda:
        "../../envs/jdnas.yaml"
    log:
        "logs/prepare_data.log",
    threads: STAGES["prepare_data"].threads
    params:
        trigger=STAGES["prepare_data"].params_hash(PARAMS),
        data=user_data_fingerprint(PARAMS),
    shell:
        stage_shell("prepare_data")
