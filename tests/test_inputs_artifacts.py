"""Artifact kinds (issue 26, class "artifacts"): a damaged or poisoned checkpoint, supernet or
torchvision state_dict is refused with one line naming the file and the first bad tensor or
field, before anything is allocated; export and import stop on non-finite weights."""
import copy
import os

import pytest
import torch

from jdnas.cli import main
from jdnas.config import load_params
from jdnas.errors import JdnasError
from jdnas.models.arch import resolve_arch
from jdnas.models.detector import build_detector, checkpoint_dict, head_config, load_detector, read_checkpoint
from conftest import REPO

SMOKE = [REPO / "params.yaml", REPO / "config" / "smoke.yaml"]


@pytest.fixture(scope="module")
def good() -> dict:
    """A tiny detector's checkpoint dict (not trained: only its format matters here)."""
    torch.manual_seed(0)
    model = build_detector(resolve_arch("tiny", 0.5), head_config(load_params(SMOKE)["model"], 3))
    return checkpoint_dict(model.eval(), stage="test")


def _first(sd: dict, kind: str = "weight") -> str:
    return next(k for k in sd if k.endswith(kind))


def _sd(fn):
    def apply(c):
        fn(c["state_dict"])
    return apply


def _set(key, value):
    def apply(c):
        c[key] = value
    return apply


def _head(key, value):
    def apply(c):
        c["head"][key] = value
    return apply


def _arch(fn):
    def apply(c):
        fn(c["arch"])
    return apply


def _nan_one(sd):
    k = _first(sd)
    sd[k] = sd[k].clone()
    sd[k].view(-1)[0] = float("nan")


def _inf_one(sign):
    def apply(sd):
        k = list(sd)[-3]
        sd[k] = sd[k].clone()
        sd[k].view(-1)[-1] = sign * float("inf")
    return apply


def _all(fn):
    def apply(sd):
        for k in list(sd):
            if sd[k].is_floating_point():
                sd[k] = fn(sd[k])
    return apply


def _dtype_one(dtype):
    def apply(sd):
        k = _first(sd)
        sd[k] = sd[k].to(dtype)
    return apply


def _huge_stage(c):
    c["arch"]["stages"][3] = {"out": 16384, "mids": [16384] * 8}


# name: (mutation of the checkpoint dict, words in the one line)
BAD = {
    "all NaN": (_sd(_all(lambda t: torch.full_like(t, float("nan")))), "values are non-finite (NaN)"),
    "one NaN": (_sd(_nan_one), "1 of"),
    "one +inf": (_sd(_inf_one(1)), "non-finite (inf)"),
    "one -inf": (_sd(_inf_one(-1)), "non-finite (inf)"),
    "all +inf": (_sd(_all(lambda t: torch.full_like(t, float("inf")))), "non-finite (inf)"),
    "int64 weights": (_sd(_all(lambda t: t.to(torch.int64))), "dtype int64, expected a floating-point weight"),
    "one int32 weight": (_sd(_dtype_one(torch.int32)), "dtype int32"),
    "one uint8 weight": (_sd(_dtype_one(torch.uint8)), "dtype uint8"),
    "one bool weight": (_sd(_dtype_one(torch.bool)), "dtype bool"),
    "one complex weight": (_sd(_dtype_one(torch.complex64)), "dtype complex64"),
    "state_dict a string": (_set("state_dict", "weights"), "state_dict: not a mapping of names to tensors (got str)"),
    "state_dict a list": (_set("state_dict", [1, 2]), "state_dict: not a mapping"),
    "state_dict None": (_set("state_dict", None), "state_dict: not a mapping"),
    "tensor a string": (_sd(lambda sd: sd.__setitem__(_first(sd), "w")), "is a str, not a tensor"),
    "tensor a list": (_sd(lambda sd: sd.__setitem__(_first(sd), [1.0])), "is a list, not a tensor"),
    "tensor missing": (_sd(lambda sd: sd.pop(_first(sd))), "does not match its arch and head (missing"),
    "tensor extra": (_sd(lambda sd: sd.__setitem__("extra.weight", torch.zeros(1))), "unexpected 'extra.weight'"),
    "tensor misshapen": (_sd(lambda sd: sd.__setitem__(_first(sd), torch.zeros(1, 2, 3))), "size mismatch"),
    "head representation_size 1e9": (_head("representation_size", 10**9), "head.representation_size = 1000000000"),
    "head fpn_channels 1e7": (_head("fpn_channels", 10**7), "head.fpn_channels = 10000000"),
    "head min_size 1e6": (_head("min_size", 10**6), "head.min_size = 1000000"),
    "head max_size 0": (_head("max_size", 0), "head.max_size = 0"),
    "head min above max": (_head("min_size", 256), "head.min_size = 256 is above head.max_size"),
    "head anchors descending": (_head("anchor_sizes", [128, 64, 32, 16, 8]), "head.anchor_sizes = [128, 64"),
    "head anchors auto": (_head("anchor_sizes", "auto"), "head.anchor_sizes = 'auto'"),
    "head anchors four": (_head("anchor_sizes", [8, 16, 32, 64]), "head.anchor_sizes"),
    "head proposals huge": (_head("rpn_post_nms_top_n_test", 10**9), "head.rpn_post_nms_top_n_test"),
    "head pre-nms huge": (_head("rpn_pre_nms_top_n_train", 10**10), "head.rpn_pre_nms_top_n_train"),
    "head detections huge": (_head("box_detections_per_img", 10**8), "head.box_detections_per_img"),
    "head batch huge": (_head("box_batch_size_per_image", 10**8), "head.box_batch_size_per_image"),
    "head thresh NaN": (_head("box_score_thresh", float("nan")), "head.box_score_thresh = nan"),
    "head thresh string": (_head("box_score_thresh", "0.5"), "head.box_score_thresh = '0.5'"),
    "head size float": (_head("min_size", 64.5), "head.min_size = 64.5"),
    "head num_classes 0": (_head("num_classes", 0), "head.num_classes = 0"),
    "head num_classes 1e9": (_head("num_classes", 10**9), "head.num_classes = 1000000000"),
    "head num_classes bool": (_head("num_classes", True), "head.num_classes = True"),
    "head missing key": (lambda c: c["head"].pop("fpn_channels"), "head: missing key 'fpn_channels'"),
    "head a list": (_set("head", [1, 2]), "head: not a mapping"),
    "arch stem 1e6": (_arch(lambda a: a.__setitem__("stem", 10**6)), "a width of 1000000 channels is above"),
    "arch mid 1e5": (_arch(lambda a: a["stages"][0].__setitem__("mids", [10**5])), "a width of 100000"),
    "arch 1000 blocks": (_arch(lambda a: a["stages"][2].__setitem__("mids", [8] * 1000)), "a stage of 1000 blocks"),
    "arch 4e9 parameters": (_huge_stage, "parameters"),
    "arch three stages": (_arch(lambda a: a["stages"].pop()), "arch: not a valid Arch"),
    "arch width 0": (_arch(lambda a: a.__setitem__("stem", 0)), "arch: not a valid Arch"),
    "arch block unknown": (_arch(lambda a: a.__setitem__("block", "dense")), "arch: not a valid Arch"),
    "arch a string": (_set("arch", "S16:1x16m16"), "arch: not a valid Arch"),
    "arch missing": (lambda c: c.pop("arch"), "arch: missing from the checkpoint"),
    "format other": (_set("format", "jdnas-supernet/1"), "format: not a jdnas-detector/1 checkpoint"),
    "format missing": (lambda c: c.pop("format"), "format: not a jdnas-detector/1"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_checkpoint_is_one_line(tmp_path, good, name):
    mutate, words = BAD[name]
    ckpt = copy.deepcopy(good)
    mutate(ckpt)
    path = tmp_path / "model.pt"
    torch.save(ckpt, path)
    with pytest.raises(JdnasError) as e:
        load_detector(path)
    msg = str(e.value)
    assert msg.startswith(str(path)) and words in msg and "\n" not in msg and len(msg) < 600, msg


FILES = {  # the checkpoint file itself: (how to make it, words)
    "not a torch file": (lambda p: p.write_bytes(b"not a checkpoint"), "not a readable checkpoint"),
    "empty file": (lambda p: p.write_bytes(b""), "not a readable checkpoint"),
    "truncated zip": (lambda p: p.write_bytes(b"PK\x03\x04 cut"), "not a readable checkpoint"),
    "a folder": (lambda p: p.mkdir(), "is a folder, not a checkpoint file"),
    "missing": (lambda p: None, "checkpoint not found"),
    "a link loop": (lambda p: os.symlink(p, p), "checkpoint not found"),
    "a tensor, not a dict": (lambda p: torch.save(torch.zeros(3), p), "format: not a jdnas-detector/1"),
    "a list": (lambda p: torch.save([1, 2], p), "format: not a jdnas-detector/1"),
}


@pytest.mark.parametrize("name", sorted(FILES))
def test_unreadable_checkpoint_file_is_one_line(tmp_path, name):
    make, words = FILES[name]
    path = tmp_path / "model.pt"
    make(path)
    with pytest.raises(JdnasError, match=words):
        read_checkpoint(path)


ACCEPTED = {
    "float16 weights": _sd(_all(lambda t: t.half())),
    "float64 weights": _sd(_all(lambda t: t.double())),
    "anchor tuple": _head("anchor_sizes", (8, 16, 32, 64, 128)),
}


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_harmless_variants_are_accepted(tmp_path, good, name):
    ckpt = copy.deepcopy(good)
    ACCEPTED[name](ckpt)
    torch.save(ckpt, tmp_path / "model.pt")
    model = load_detector(tmp_path / "model.pt")
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())


# --- export and import stop on poisoned weights -------------------------------------------------
EXPORT_BAD = ["all NaN", "one NaN", "one +inf", "int64 weights", "state_dict a string", "head representation_size 1e9"]


@pytest.mark.parametrize("name", EXPORT_BAD)
def test_export_refuses_poisoned_checkpoints(tmp_path, good, capsys, name):
    ckpt = copy.deepcopy(good)
    BAD[name][0](ckpt)
    torch.save(ckpt, tmp_path / "model.pt")
    assert main(["export", str(tmp_path / "model.pt"), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"jdnas: error: {tmp_path / 'model.pt'}: ") and BAD[name][1] in err[0]
    assert not (tmp_path / "m.onnx").exists() and not list(tmp_path.glob(".m.onnx.*"))


# --- supernet checkpoints ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def supernet_dict(good) -> dict:
    from jdnas.models.elastic import PoolSpace, Supernet
    from jdnas.joint.teacher_pool import SUPERNET_FORMAT
    space = PoolSpace(resolve_arch("tiny", 0.5), (1, 1, 1, 1))
    net = Supernet(space, good["head"])
    return {"format": SUPERNET_FORMAT, "space": space.to_json(), "head": dict(good["head"]),
            "state_dict": {k: v.detach().clone() for k, v in net.model.state_dict().items()}, "meta": {}}


SUPERNET_BAD = {
    "NaN weight": (_sd(_nan_one), "non-finite (NaN)"),
    "int64 weights": (_sd(_all(lambda t: t.long())), "dtype int64"),
    "head representation_size 1e9": (_head("representation_size", 10**9), "head.representation_size"),
    "space huge": (lambda c: c["space"]["max_arch"].__setitem__("stem", 10**6), "space.max_arch: a width of 1000000"),
    "state_dict a string": (_set("state_dict", "x"), "state_dict: not a mapping"),
}


def test_a_good_supernet_loads(tmp_path, supernet_dict):
    from jdnas.joint.teacher_pool import load_supernet
    torch.save(supernet_dict, tmp_path / "supernet.pt")
    assert load_supernet(tmp_path / "supernet.pt").space.max_arch == resolve_arch("tiny", 0.5)


@pytest.mark.parametrize("name", sorted(SUPERNET_BAD))
def test_bad_supernet_is_one_line(tmp_path, supernet_dict, name):
    from jdnas.joint.teacher_pool import load_supernet
    ckpt = copy.deepcopy(supernet_dict)
    SUPERNET_BAD[name][0](ckpt)
    torch.save(ckpt, tmp_path / "supernet.pt")
    with pytest.raises(JdnasError) as e:
        load_supernet(tmp_path / "supernet.pt")
    assert str(e.value).startswith(str(tmp_path / "supernet.pt")) and SUPERNET_BAD[name][1] in str(e.value), e.value


# --- torchvision state_dicts ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tv_sd() -> dict:
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    torch.manual_seed(0)
    model = FasterRCNN(resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5), num_classes=3)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


TV_BAD = {
    "all NaN": (lambda sd: {k: torch.full_like(v, float("nan")) for k, v in sd.items()}, "non-finite (NaN)"),
    "one NaN": (lambda sd: {**sd, "rpn.head.conv.0.0.weight": torch.full_like(sd["rpn.head.conv.0.0.weight"],
                                                                               float("nan"))},
                "rpn.head.conv.0.0.weight: "),
    "one inf": (lambda sd: {**sd, "backbone.body.conv1.weight": sd["backbone.body.conv1.weight"] / 0},
                "backbone.body.conv1.weight"),
    "int64": (lambda sd: {k: v.long() for k, v in sd.items()}, "dtype int64"),
    "a string": (lambda sd: "not a state dict", "not a state_dict (a mapping of names to tensors; got str)"),
    "a list": (lambda sd: list(sd.values()), "not a state_dict"),
    "a value not a tensor": (lambda sd: {**sd, "x": 3}, "not a state_dict"),
    "wrapped NaN": (lambda sd: {"model": {k: v * float("nan") for k, v in sd.items()}}, "non-finite (NaN)"),
}


@pytest.mark.parametrize("name", sorted(TV_BAD))
def test_import_refuses_poisoned_state_dicts(tmp_path, tv_sd, capsys, name):
    make, words = TV_BAD[name]
    torch.save(make(tv_sd), tmp_path / "tv.pth")
    assert main(["import-torchvision", str(tmp_path / "tv.pth"), "--out", str(tmp_path / "jd.pt"),
                 "--params", str(REPO / "params.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "tv.pth") in err[0] and words in err[0], err
    assert not (tmp_path / "jd.pt").exists()


# --- defaults that follow the source (torchvision's own head settings) ----------------------------
TV_HEAD = {"min_size": 800, "max_size": 1333, "anchor_sizes": [32, 64, 128, 256, 512],
           "rpn_pre_nms_top_n_test": 1000, "rpn_post_nms_top_n_test": 1000, "box_detections_per_img": 100,
           "box_score_thresh": 0.05, "rpn_pre_nms_top_n_train": 2000, "rpn_post_nms_top_n_train": 2000,
           "rpn_batch_size_per_image": 256, "box_batch_size_per_image": 512}


def test_import_without_params_keeps_torchvisions_head(tmp_path, tv_sd, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # params.yaml there: the demo's 128-px head, which must not be used
    torch.save(tv_sd, tmp_path / "tv.pth")
    assert main(["import-torchvision", str(tmp_path / "tv.pth"), "--out", str(tmp_path / "jd.pt")]) == 0
    cap = capsys.readouterr()
    head = load_detector(tmp_path / "jd.pt").head_cfg
    assert {k: head[k] for k in TV_HEAD} == TV_HEAD
    assert "head settings from the params: none; torchvision's defaults: min_size, max_size" in cap.err


def test_import_takes_what_the_params_set(tmp_path, tv_sd, capsys):
    torch.save(tv_sd, tmp_path / "tv.pth")
    (tmp_path / "p.yaml").write_text("model:\n  min_size: 320\n  max_size: 512\n")
    assert main(["import-torchvision", str(tmp_path / "tv.pth"), "--out", str(tmp_path / "jd.pt"),
                 "--params", str(REPO / "params.yaml"), "--params", str(tmp_path / "p.yaml")]) == 0
    head = load_detector(tmp_path / "jd.pt").head_cfg
    assert (head["min_size"], head["max_size"]) == (320, 512)  # and params.yaml sets the rest explicitly
    assert head["box_detections_per_img"] == 50
    (tmp_path / "q.yaml").write_text("model:\n  min_size: 96\n")  # <= the default max_size 128
    assert main(["import-torchvision", str(tmp_path / "tv.pth"), "--out", str(tmp_path / "jd2.pt"),
                 "--params", str(tmp_path / "q.yaml")]) == 0
    head = load_detector(tmp_path / "jd2.pt").head_cfg
    assert head["min_size"] == 96 and head["max_size"] == 1333 and head["box_detections_per_img"] == 100
    assert "head settings from the params: min_size;" in capsys.readouterr().err
