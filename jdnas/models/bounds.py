"""Upper bounds of every size that decides memory, checked before anything is allocated: on
params (jdnas.config) and on the arch and head read from a checkpoint (jdnas.models.detector).
No torch here: the schema imports it at parse time."""
from __future__ import annotations

# Upper bounds of sizes that decide memory, checked before anything is allocated: generous for
# COCO R101-FPN (config/coco_r101.yaml), far below what would try to allocate terabytes.
MAX_ITERS = 100_000_000
MAX_BATCH = 1024           # images per batch
MAX_INPUT = 4096           # model.min_size / max_size (COCO: 800 / 1333)
MAX_FPN = 2048             # model.fpn_channels (COCO: 256)
MAX_REP = 8192             # model.representation_size (COCO: 1024)
MAX_PROPOSALS = 100_000    # RPN proposals (COCO: 2000)
MAX_SAMPLES = 8192         # RPN / box-head samples per image (COCO: 256 / 512)
MAX_DETECTIONS = 10_000    # detections per image (COCO: 100)
MAX_SEED = 2**32 - 1       # seeds derived from it (seed x 1000 + i, ...) stay far below torch's 2**63
MIN_WIDTH_MULT, MAX_WIDTH_MULT = 1 / 64, 8.0

# Upper bounds that keep a detector buildable: checked on params and on every checkpoint's arch
# and head before any tensor is allocated (R101-FPN at width 1 is ~60M parameters).
MAX_WIDTH = 16384       # channels of any backbone layer
MAX_DEPTH = 64          # blocks per stage
MAX_CLASSES = 10_000    # object classes (background excluded)
MAX_PARAMS = 1_000_000_000  # estimated parameters of the whole detector (4 GB of float32 weights)

# the head keys' integer ranges (anchor_sizes and box_score_thresh are checked apart)
HEAD_RANGES = {
    "fpn_channels": (4, MAX_FPN), "min_size": (16, MAX_INPUT), "max_size": (16, MAX_INPUT),
    "rpn_pre_nms_top_n_train": (1, MAX_PROPOSALS), "rpn_post_nms_top_n_train": (1, MAX_PROPOSALS),
    "rpn_pre_nms_top_n_test": (1, MAX_PROPOSALS), "rpn_post_nms_top_n_test": (1, MAX_PROPOSALS),
    "rpn_batch_size_per_image": (1, MAX_SAMPLES), "box_batch_size_per_image": (1, MAX_SAMPLES),
    "representation_size": (1, MAX_REP), "box_detections_per_img": (1, MAX_DETECTIONS),
}
