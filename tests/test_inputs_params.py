"""Params kinds (issue 26, class "params"): every bad params file is refused with one bounded line
(exit 2 from the CLI, no traceback); sizes that decide memory are bounded before anything is
allocated; the shipped configs still load."""
import pytest

from jdnas.cli import main
from jdnas.config import load_params
from jdnas.errors import ConfigError
from conftest import REPO, write_yaml

BASE = [REPO / "params.yaml"]

# (override, words in the one line)
BAD = {
    # the joint search's own keys
    "search iters 0": ({"search": {"iters": 0}}, "search.iters = 0 is not allowed"),
    "trial longer than its round": ({"search": {"trial_iters": 500, "round_iters": 100}},
                                    "search.trial_iters must be <= search.round_iters"),
    "confidence 1": ({"search": {"confidence": 1.0}}, "search.confidence = 1.0 is not allowed"),
    "bootstrap 1 resample": ({"search": {"bootstrap": 1}}, "search.bootstrap = 1 is not allowed"),
    "screen a string": ({"search": {"screen": "yes"}}, "search.screen = 'yes' is not allowed"),
    "teacher moves negative": ({"search": {"teacher_moves": -1}}, "search.teacher_moves = -1 is not allowed"),
    "no teacher move kind": ({"search": {"teacher_mutate": 0, "teacher_resample": 0}}, "at least one must be > 0"),
    "resize_min_object negative": ({"search_space": {"resize_min_object": -1}},
                                   "search_space.resize_min_object = -1 is not allowed"),
    "max_mape 0": ({"latency": {"max_mape": 0}}, "latency.max_mape = 0 is not allowed"),
    "ap_tolerance negative": ({"search": {"ap_tolerance": -0.5}}, "search.ap_tolerance = -0.5 is not allowed"),
    # sizes that decide memory
    "representation_size 1e9": ({"model": {"representation_size": 10**9}}, "model.representation_size = 1000000000"),
    "fpn_channels 1e7": ({"model": {"fpn_channels": 10**7}}, "model.fpn_channels = 10000000 is not allowed"),
    "min_size huge": ({"model": {"min_size": 100_000}}, "model.min_size = 100000 is not allowed"),
    "max_size huge": ({"model": {"max_size": 10**6}}, "model.max_size = 1000000"),
    "proposals train huge": ({"model": {"rpn_pre_nms_top_n_train": 10**9}}, "model.rpn_pre_nms_top_n_train"),
    "proposals test huge": ({"model": {"rpn_post_nms_top_n_test": 10**8}}, "model.rpn_post_nms_top_n_test"),
    "rpn batch huge": ({"model": {"rpn_batch_size_per_image": 10**6}}, "model.rpn_batch_size_per_image"),
    "box batch huge": ({"model": {"box_batch_size_per_image": 10**6}}, "model.box_batch_size_per_image"),
    "detections huge": ({"model": {"box_detections_per_img": 10**7}}, "model.box_detections_per_img"),
    "train batch huge": ({"train_base": {"batch_size": 10**6}}, "train_base.batch_size = 1000000"),
    "student batch huge": ({"train_student": {"batch_size": 10**5}}, "train_student.batch_size"),
    "pool batch huge": ({"teacher_pool": {"train": {"batch_size": 10**5}}}, "teacher_pool.train.batch_size"),
    "eval batch huge": ({"eval": {"batch_size": 10**5}}, "eval.batch_size = 100000"),
    "bn batch huge": ({"teacher_pool": {"eval": {"bn_batch_size": 10**5}}}, "teacher_pool.eval.bn_batch_size"),
    "synthetic images huge": ({"data": {"synthetic": {"train_images": 10**9}}}, "data.synthetic.train_images"),
    "max_image_pixels huge": ({"data": {"max_image_pixels": 10**12}}, "data.max_image_pixels"),
    "iters huge": ({"train_base": {"iters": 10**12}}, "train_base.iters = 1000000000000"),
    "workers huge": ({"train_base": {"workers": 10**4}}, "train_base.workers"),
    "depth huge": ({"search_space": {"max_depth": [3, 4, 1000, 3]}}, "search_space.max_depth"),
    "arch string huge widths": ({"model": {"base": "S16:1x100000m16-1x32m32-1x64m64-1x128m128"}},
                                "a width of 100000 channels is above the limit"),
    "arch string huge depth": ({"model": {"base": "S16:100x16m16-1x32m32-1x64m64-1x128m128"},
                                "search_space": {"max_depth": [64, 4, 6, 3]}}, "a stage of 100 blocks is above"),
    "arch deep beyond limit": ({"model": {"base": "S16:65x16m16-1x32m32-1x64m64-1x128m128"}},
                               "a stage of 65 blocks is above the limit 64"),
    "r101 at width 8": ({"model": {"base": "r101", "width": 8.0}}, "parameters"),
    "pool huge": ({"teacher_pool": {"space": {"base": "S16:1x99999m16-1x32m32-1x64m64-1x128m128"}}},
                  "teacher_pool.space.base"),
    "fpn x rep product": ({"model": {"fpn_channels": 2048, "representation_size": 8192}}, "parameters"),
    # numeric ranges
    "width 1e-9": ({"model": {"width": 1e-9}}, "model.width = 1e-09 is not allowed"),
    "width 100": ({"model": {"width": 100.0}}, "model.width = 100.0 is not allowed"),
    "pool width tiny": ({"teacher_pool": {"space": {"width": 1e-6}}}, "teacher_pool.space.width"),
    "lr 1e308": ({"train_base": {"lr": 1e308}}, "train_base.lr = 1e+308 is not allowed"),
    "lr 0": ({"train_base": {"lr": 0}}, "train_base.lr = 0 is not allowed"),
    "student lr huge": ({"train_student": {"lr": 1000.0}}, "train_student.lr = 1000.0"),
    "momentum 1": ({"train_base": {"momentum": 1.0}}, "train_base.momentum = 1.0 is not allowed"),
    "momentum negative": ({"train_base": {"momentum": -0.1}}, "train_base.momentum = -0.1"),
    "weight decay 5": ({"train_base": {"weight_decay": 5.0}}, "train_base.weight_decay = 5.0"),
    "seed 2**70": ({"seed": 2**70}, "seed = 1180591620717411303424 is not allowed"),
    "seed 2**63": ({"seed": 2**63}, "seed = 9223372036854775808 is not allowed"),
    "seed bool": ({"seed": True}, "seed = True is not allowed"),
    "score thresh 2": ({"model": {"box_score_thresh": 2.0}}, "model.box_score_thresh = 2.0"),
    "clip_grad inf": ({"train_base": {"clip_grad": float("inf")}}, "train_base.clip_grad = inf"),
    # ordered lists
    "steps descending": ({"train_base": {"steps": [0.9, 0.7]}}, "train_base.steps = [0.9, 0.7] is not allowed"),
    "steps repeated": ({"train_base": {"steps": [0.5, 0.5]}}, "in increasing order"),
    "pool steps out of order": ({"teacher_pool": {"train": {"steps": [0.9, 0.3]}}}, "teacher_pool.train.steps"),
    "student steps > 1": ({"train_student": {"steps": [0.5, 1.5]}}, "train_student.steps"),
    "anchors descending": ({"model": {"anchor_sizes": [256, 128, 64, 32, 16]}}, "model.anchor_sizes = [256, 128"),
    "anchors repeated": ({"model": {"anchor_sizes": [16, 16, 32, 64, 128]}}, "in increasing order"),
    "anchors huge": ({"model": {"anchor_sizes": [16, 32, 64, 128, 10**6]}}, "model.anchor_sizes"),
    "anchors float": ({"model": {"anchor_sizes": [16.5, 32, 64, 128, 256]}}, "model.anchor_sizes"),
    # types
    "min_size string": ({"model": {"min_size": "800px"}}, "model.min_size = '800px'"),
    "fpn float": ({"model": {"fpn_channels": 64.0}}, "model.fpn_channels = 64.0"),
    "batch null": ({"train_base": {"batch_size": None}}, "train_base.batch_size = None"),
    "model list": ({"model": [1, 2]}, "model must be a mapping"),
    "unknown top": ({"modle": {}}, "unknown key 'modle'"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_params_are_one_line(tmp_path, name):
    override, words = BAD[name]
    f = write_yaml(tmp_path / "bad.yaml", override)
    with pytest.raises(ConfigError) as e:
        load_params([*BASE, f])
    msg = str(e.value)
    assert words in msg and "\n" not in msg and len(msg) < 700, msg


RAW = {  # files yaml.safe_dump cannot write: (bytes, words)
    "latin-1 bytes": (b"seed: 1\nmodel:\n  base: r\xe9sum\xe9\n", "not UTF-8 text (byte 0xe9"),
    "utf-16": ("seed: 1\n".encode("utf-16"), "not UTF-8 text"),
    "binary junk": (bytes(range(256)), "not UTF-8 text"),
    "nested 5000 deep": (("a: " + "[" * 5000 + "]" * 5000 + "\n").encode(), "bad.yaml: invalid YAML: nested too deep"),
    "nested mappings deep": (("".join(f"{' ' * i}k{i}:\n" for i in range(3000)) + " " * 3000 + "x: 1\n").encode(),
                             "bad.yaml"),
    "duplicate key": (b"seed: 1\nseed: 2\n", "duplicate key 'seed'"),
    "tab indent": (b"model:\n\tbase: r18\n", "invalid YAML"),
    "python tag": (b"seed: !!python/object/apply:os.system ['true']\n", "invalid YAML"),
    "top-level list": (b"- 1\n- 2\n", "top level must be a mapping"),
    "top-level string": (b"hello\n", "top level must be a mapping"),
}


def _alias_bomb(levels: int = 5) -> str:
    """A flow list of 10^levels leaves built from nested anchors (a 'billion laughs')."""
    text = "&a0 [" + ", ".join(["xxxxxxxxxx"] * 10) + "]"
    for i in range(1, levels):
        text = f"&a{i} [{text}, " + ", ".join([f"*a{i - 1}"] * 9) + "]"
    return text


RAW["alias bomb as model.width"] = (f"model:\n  width: {_alias_bomb()}\n".encode(), "model.width = [[[[")
RAW["alias bomb as model.base"] = (f"model:\n  base: {_alias_bomb()}\n".encode(), "model.base = [[[[")
RAW["alias bomb as unknown key"] = (f"model:\n  widthh: {_alias_bomb()}\n".encode(), "unknown key 'model.widthh'")


@pytest.mark.parametrize("name", sorted(RAW))
def test_unreadable_params_files_are_one_bounded_line_from_the_cli(tmp_path, capsys, name):
    content, words = RAW[name]
    f = tmp_path / "bad.yaml"
    f.write_bytes(content)
    assert main(["arch", "tiny", "--params", str(REPO / "params.yaml"), "--params", str(f)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jdnas: error: ") and "Traceback" not in err[0], err
    assert len(err[0]) < 1200, len(err[0])
    assert words in err[0], err[0]


def test_alias_bomb_value_is_shortened(tmp_path):
    """The alias bomb is refused, and the line shows a shortened value, not the expansion (522 KB before)."""
    f = tmp_path / "bomb.yaml"
    f.write_text(f"train_base:\n  steps: {_alias_bomb()}\n")
    with pytest.raises(ConfigError) as e:
        load_params([*BASE, f])
    assert "train_base.steps = [[[[" in str(e.value) and len(str(e.value)) < 700


GOOD = {
    "coco r101": [REPO / "params.yaml", REPO / "config" / "coco_r101.yaml"],
    "smoke": [REPO / "params.yaml", REPO / "config" / "smoke.yaml"],
    "gpu": [REPO / "params.yaml", REPO / "config" / "gpu.yaml"],
    "defaults": [REPO / "params.yaml"],
}


@pytest.mark.parametrize("name", sorted(GOOD))
def test_shipped_configs_still_load(name):
    load_params(GOOD[name])


EDGE_OK = {
    "seed 2**32-1": {"seed": 2**32 - 1},
    "width 1/64": {"model": {"width": 1 / 64}},
    "lr 10": {"train_base": {"lr": 10.0}},
    "anchors torchvision": {"model": {"anchor_sizes": [32, 64, 128, 256, 512]}},
    "coco sizes": {"model": {"min_size": 800, "max_size": 1333, "fpn_channels": 256, "representation_size": 1024}},
    "one step": {"train_base": {"steps": [0.8]}},
}


@pytest.mark.parametrize("name", sorted(EDGE_OK))
def test_bounds_are_generous(tmp_path, name):
    load_params([*BASE, write_yaml(tmp_path / "ok.yaml", EDGE_OK[name])])
