import pytest

from jdnas.config import SCHEMA, Opt, defaults, load_params
from jdnas.errors import ConfigError
from conftest import REPO, write_yaml


def _leaves(schema: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in schema.items():
        out |= _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
    return out


def _keys(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        out |= _keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
    return out


def test_params_yaml_is_complete_and_valid():
    import yaml
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert _keys(raw) == _leaves(SCHEMA), "params.yaml must spell out every key of the schema"
    load_params([REPO / "params.yaml"])


@pytest.mark.parametrize("name", ["smoke.yaml", "coco_r101.yaml"])
def test_shipped_configs_validate(name):
    p = load_params([REPO / "params.yaml", REPO / "config" / name])
    assert p["model"]["base"]


def test_defaults_validate():
    # every default passes its own check
    def walk(schema, d):
        for k, v in schema.items():
            if isinstance(v, Opt):
                assert v.check(d[k]), k
            else:
                walk(v, d[k])
    walk(SCHEMA, defaults())


@pytest.mark.parametrize("content, words", [
    ({"train_base": {"lrr": 0.1}}, "unknown key 'train_base.lrr'"),
    ({"bogus": 1}, "unknown key 'bogus'"),
    ({"train_base": {"iters": "many"}}, "train_base.iters = 'many' is not allowed: must be an integer >= 1"),
    ({"train_base": {"lr": -1}}, "train_base.lr = -1 is not allowed: must be a number > 0.0"),
    ({"train_base": {"schedule": "linear"}}, "must be one of cosine, step, constant"),
    ({"device": "gpu"}, "device = 'gpu' is not allowed"),
    ({"data": {"synthetic": {"classes": ["circle", "blob"]}}}, "data.synthetic.classes"),
    ({"data": {"synthetic": {"min_objects": 5, "max_objects": 2}}}, "min_objects must be <="),
    ({"data": {"source": "coco"}}, "data.coco.train_images is required"),
    ({"model": {"base": "r999"}}, "model.base = 'r999' is not allowed"),
    ({"model": 3}, "model must be a mapping"),
    # the search space and the latency table's grid come from the same keys; what could disagree is refused
    ({"search_space": {"max_depth": [2, 2, 1, 2]}}, "search_space.max_depth = [2, 2, 1, 2] is below model.base's"),
    ({"search_space": {"min_depth": [1, 3, 1, 1]}}, "search_space.min_depth = [1, 3, 1, 1] is above model.base's"),
    ({"search_space": {"min_width": 64, "max_width": 32}}, "search_space.min_width must be <= search_space.max_width"),
    ({"search_space": {"actions": ["widen"]}}, "search_space.actions has widen but latency.space.width_ratios"),
    ({"search_space": {"resize_ratios": [1.5]}}, "search_space.resize_ratios = [1.5] is not allowed"),
    ({"search_space": {"actions": ["prune", "teleport"]}}, "search_space.actions = ['prune', 'teleport']"),
    ({"latency": {"space": {"max_depth": [3, 4, 6, 3]}}}, "unknown key 'latency.space.max_depth'"),
    ({"train_base": {"lr": float("inf")}}, "train_base.lr = inf is not allowed"),
    ({"train_base": {"weight_decay": float("nan")}}, "train_base.weight_decay = nan is not allowed"),
    ({"model": {"anchor_sizes": [8, 16, 32, 64, 128, 256]}}, "must be a list of exactly 5 integers"),
    ({"train_base": {"scales": [0.0]}}, "train_base.scales = [0.0] is not allowed"),
    ({"train_base": {"iters": "3 weeks"}}, "train_base.iters = '3 weeks' is not allowed"),
    ({"seed": -1}, "seed = -1 is not allowed"),
    ({"seed": 1.5}, "seed = 1.5 is not allowed"),
    ({"device": "tpu"}, "device = 'tpu' is not allowed"),
    ({"data": {"minival_fraction": 0.95}}, "data.minival_fraction = 0.95 is not allowed"),
    ({"data": {"max_image_pixels": 0}}, "data.max_image_pixels = 0 is not allowed"),
    ({"data": {"out_of_image": "drop"}}, "data.out_of_image = 'drop' is not allowed"),
    ({"model": {"width": 0}}, "model.width = 0 is not allowed"),
    ({"model": {"min_size": "big"}}, "model.min_size = 'big' is not allowed"),
    ({"eval": {"batch_size": 0}}, "eval.batch_size = 0 is not allowed"),
    ({"train_student": {"kd_loss": "l2"}}, "train_student.kd_loss = 'l2' is not allowed"),
    ({"train_student": {"kd_temperature": 0}}, "train_student.kd_temperature = 0 is not allowed"),
    ({"search": {"rounds": 0}}, "search.rounds = 0 is not allowed"),
    ({"search": {"latency_target": 0}}, "search.latency_target = 0 is not allowed"),
    ({"search": {"penalty": float("nan")}}, "search.penalty = nan is not allowed"),
    ({"search": {"iters": -1}}, "search.iters = -1 is not allowed"),
    ({"search": {"trial_iters": 500, "round_iters": 100}}, "search.trial_iters must be <= search.round_iters"),
    ({"search": {"cut_trial_iters": 500, "round_iters": 100}}, "search.cut_trial_iters must be <= search.round_iters"),
    ({"search": {"confidence": 1.5}}, "search.confidence = 1.5 is not allowed"),
    ({"search": {"paired": "yes"}}, "search.paired = 'yes' is not allowed"),
    ({"search": {"teacher_mutate": 0, "teacher_resample": 0}}, "at least one must be > 0"),
    ({"search_space": {"min_depth": [1, 1, 1]}}, "search_space.min_depth"),
    ({"search_space": {"prune_ratios": [1.0]}}, "search_space.prune_ratios"),
    ({"baseline": {"nas_iters": 0}}, "baseline.nas_iters = 0 is not allowed"),
    ({"latency": {"clock": "tsc"}}, "latency.clock = 'tsc' is not allowed"),
    ({"latency": {"image_size": [8, 8]}}, "latency.image_size = [8, 8] is not allowed"),
    ({"teacher_pool": {"init": "random"}}, "teacher_pool.init = 'random' is not allowed"),
    ({"teacher_pool": {"train": {"gpus": 0}}}, "teacher_pool.train.gpus = 0 is not allowed"),
])
def test_bad_params_fail_with_one_line_naming_the_key(tmp_path, content, words):
    f = write_yaml(tmp_path / "bad.yaml", content)
    with pytest.raises(ConfigError) as e:
        load_params([REPO / "params.yaml", f])
    msg = str(e.value)
    assert words in msg
    assert "\n" not in msg


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_params([bad])
    with pytest.raises(ConfigError, match="not found"):
        load_params([tmp_path / "nope.yaml"])


def test_later_files_override(tmp_path):
    f = write_yaml(tmp_path / "o.yaml", {"train_base": {"iters": 7}})
    p = load_params([REPO / "params.yaml", f])
    assert p["train_base"]["iters"] == 7
    assert p["train_base"]["lr"] == load_params([REPO / "params.yaml"])["train_base"]["lr"]


def test_a_key_given_twice_is_an_error_not_the_last_one_wins(tmp_path):
    f = tmp_path / "dup.yaml"
    f.write_text("train_base:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: invalid YAML: duplicate key 'lr' \(line 3\)"):
        load_params([REPO / "params.yaml", f])
