import random

import pytest
import torch

from jdnas.models.arch import PRESET_NAMES, Arch, Stage, preset, resolve_arch
from jdnas.models.complexity import count_flops, count_params
from jdnas.models.detector import build_detector, head_config


def random_arch(rng: random.Random) -> Arch:
    block = rng.choice(["basic", "bottleneck"])
    stages = []
    for _ in range(4):
        depth = rng.randint(1, 5)
        stages.append(Stage(rng.choice([8, 16, 24, 64]), tuple(rng.choice([4, 8, 12]) for _ in range(depth))))
    return Arch(block, rng.choice([8, 16, 32]), tuple(stages))


@pytest.mark.parametrize("name", PRESET_NAMES)
@pytest.mark.parametrize("width", [0.25, 0.5, 1.0, 1.5])
def test_preset_round_trips(name, width):
    a = preset(name, width)
    assert Arch.parse(str(a)) == a
    assert Arch.from_json(a.to_json()) == a
    assert hash(a) == hash(Arch.parse(str(a)))


def test_random_archs_round_trip():
    rng = random.Random(0)
    for _ in range(200):
        a = random_arch(rng)
        assert Arch.parse(str(a)) == a
        assert Arch.from_json(a.to_json()) == a


def test_short_string_form():
    assert str(preset("r50")) == "B64:3x256m64-4x512m128-6x1024m256-3x2048m512"
    a = Arch.parse("S16:2x16m16,8-1x32m32-1x64m64-1x128m128")
    assert a.stages[0].mids == (16, 8)
    assert str(a) == "S16:2x16m16,8-1x32m32-1x64m64-1x128m128"


@pytest.mark.parametrize("text", ["", "X16:1x16m16-1x32m32-1x64m64-1x128m128", "S16:1x16m16-1x32m32-1x64m64",
                                  "S16:2x16m16,8,8-1x32m32-1x64m64-1x128m128", "S16:1x16-1x32m32-1x64m64-1x128m128"])
def test_parse_rejects_malformed(text):
    with pytest.raises(ValueError):
        Arch.parse(text)


def test_resolve_arch_unknown_preset():
    with pytest.raises(ValueError, match="not an Arch string"):
        resolve_arch("r999")


def test_presets_have_expected_depths():
    assert preset("r101").depths == (3, 4, 23, 3)
    assert preset("r18").depths == (2, 2, 2, 2)
    assert preset("r50", 0.5).widths == (128, 256, 512, 1024)


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_every_preset_builds_and_runs_forward_backward(name, smoke_params):
    torch.manual_seed(0)
    model = build_detector(preset(name, 0.25), head_config(smoke_params["model"], 3))
    model.train()
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 48)]
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 40.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[10.0, 8.0, 20.0, 20.0], [30.0, 30.0, 46.0, 60.0]]), "labels": torch.tensor([2, 1])}]
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    grads = [p.grad for p in model.backbone.body.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and out[0]["boxes"].shape[1] == 4
    feats = model.backbone.body(torch.rand(1, 3, 64, 64))
    assert [f.shape[1] for f in feats.values()] == list(model.arch.widths)
    assert [64 // f.shape[-1] for f in feats.values()] == [4, 8, 16, 32]


def test_complexity_grows_with_size(smoke_params):
    cfg = head_config(smoke_params["model"], 3)
    small, big = build_detector(preset("r18", 0.25), cfg), build_detector(preset("r34", 0.25), cfg)
    assert count_params(big) > count_params(small)
    assert count_flops(big) > count_flops(small) > 0
