"""KD losses, masks, the teacher wrapper and KD training through the engine."""
from __future__ import annotations

import copy

import pytest
import torch

from jdnas.data.dataset import CocoDetection
from jdnas.engine.loop import train_detector
from jdnas.errors import JdnasError
from jdnas.joint.distill import (Distiller, Teacher, box_masks, check_compatible, fpn_loss, fpn_masked_loss, standardize,
                           logits_loss, make_adapters)
from jdnas.models.arch import preset
from jdnas.models.detector import build_detector, head_config

LEVELS = ["0", "1", "2", "3"]
BATCH_HW = (64, 64)


def feats(channels: int, seed: int, requires_grad: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, lvl in enumerate(LEVELS):
        s = 64 // 4 // 2 ** i
        out[lvl] = torch.randn(2, channels, s, s, generator=g).requires_grad_(requires_grad)
    return out


BOXES = [torch.tensor([[16.0, 16.0, 32.0, 32.0]]), torch.zeros(0, 4)]


# --- losses are zero for an identical student, positive and differentiable otherwise --------------
@pytest.mark.parametrize("kind", ["fpn", "fpn_masked"])
def test_feature_losses_zero_for_identical_student_with_identity_adapter(kind):
    t = feats(8, 0)
    adapters = make_adapters(8, 8)
    assert all(isinstance(a, torch.nn.Identity) for a in adapters.values())
    loss = (fpn_loss(t, t, adapters) if kind == "fpn"
            else fpn_masked_loss(t, t, adapters, BOXES, BATCH_HW, 1.0, 0.5))
    assert loss.item() == 0.0


@pytest.mark.parametrize("student_channels", [8, 4])
@pytest.mark.parametrize("kind", ["fpn", "fpn_masked"])
def test_feature_losses_positive_and_differentiable(kind, student_channels):
    t, s = feats(8, 0), feats(student_channels, 1, requires_grad=True)
    adapters = make_adapters(student_channels, 8)
    loss = (fpn_loss(s, t, adapters) if kind == "fpn"
            else fpn_masked_loss(s, t, adapters, BOXES, BATCH_HW, 1.0, 0.5))
    assert loss.item() > 0
    loss.backward()
    for lvl in LEVELS:
        assert s[lvl].grad is not None and s[lvl].grad.abs().sum() > 0
    if student_channels != 8:   # widths differ: a learnable 1x1 conv per level
        for a in adapters.values():
            assert isinstance(a, torch.nn.Conv2d) and a.weight.grad.abs().sum() > 0


def test_fpn_loss_is_the_mse_of_standardized_features_per_level():
    t, s = feats(8, 0), feats(8, 1)
    expected = torch.stack([((standardize(s[k]) - standardize(t[k])) ** 2).mean() for k in LEVELS]).mean()
    torch.testing.assert_close(fpn_loss(s, t, make_adapters(8, 8)), expected)


def test_kd_error_ignores_the_teacher_scale():
    """A teacher whose features are a scaled copy of the student's teaches nothing new: zero loss."""
    s = feats(8, 1)
    t = {k: 20.0 * v + 3.0 for k, v in s.items()}
    assert float(fpn_loss(s, t, make_adapters(8, 8))) < 1e-6
    x = standardize(torch.randn(2, 4, 5, 6) * 7 + 2)
    torch.testing.assert_close(x.mean(dim=(-2, -1)), torch.zeros(2, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(dim=(-2, -1), unbiased=False), torch.ones(2, 4), atol=1e-4, rtol=0)


def test_logits_loss_zero_positive_differentiable():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(10, 5, generator=g)
    assert logits_loss(t, t).abs().item() < 1e-6
    assert logits_loss(t, t, temperature=3.0).abs().item() < 1e-6
    s = torch.randn(10, 5, generator=g, requires_grad=True)
    loss = logits_loss(s, t, temperature=2.0)
    assert loss.item() > 0
    loss.backward()
    assert s.grad.abs().sum() > 0
    # the KL of the softmaxes at T, times T^2
    p_t = torch.softmax(t / 2, -1)
    ref = (p_t * (p_t.log() - torch.log_softmax(s.detach() / 2, -1))).sum(-1).mean() * 4
    torch.testing.assert_close(loss.detach(), ref)


# --- masks -----------------------------------------------------------------------------------------
def test_box_masks_cover_the_right_pixels():
    boxes = [torch.tensor([[16.0, 16.0, 32.0, 32.0]]), torch.tensor([[0.0, 40.0, 64.0, 48.0]]), torch.zeros(0, 4)]
    m = box_masks(boxes, (64, 64), (8, 8))            # stride 8: centres at 4, 12, 20, 28, ...
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[2:4, 2:4] = True                          # centres 20 and 28 lie in [16, 32)
    assert torch.equal(m[0], expected)
    row = torch.zeros(8, 8, dtype=torch.bool)
    row[5, :] = True                                   # centre 44 lies in [40, 48); every column
    assert torch.equal(m[1], row)
    assert not m[2].any()                              # no boxes: all background
    # a box smaller than a stride still marks the pixel holding its centre
    small = box_masks([torch.tensor([[17.0, 33.0, 19.0, 35.0]])], (64, 64), (4, 4))  # stride 16
    assert small[0].sum() == 1 and small[0, 2, 1]
    # non-square padded batch: strides per axis
    wide = box_masks([torch.tensor([[64.0, 0.0, 128.0, 32.0]])], (64, 128), (2, 4))  # stride 32 both ways
    assert torch.equal(wide[0], torch.tensor([[False, False, True, True], [False, False, False, False]]))


def test_masked_loss_weights_inside_and_outside_boxes():
    t = feats(4, 0)
    s = {k: v.clone() for k, v in t.items()}
    adapters = make_adapters(4, 4)
    boxes = [torch.tensor([[16.0, 16.0, 32.0, 32.0]]), torch.tensor([[16.0, 16.0, 32.0, 32.0]])]
    level0 = box_masks(boxes, BATCH_HW, (16, 16))       # stride 4: the box covers a 4x4 patch
    assert level0[0].sum() == 16
    s["0"] = t["0"] + 2.0 * level0[:, None].float() * torch.randn_like(t["0"])  # disturb inside the box, level 0
    err = ((standardize(s["0"]) - standardize(t["0"])) ** 2).mean(1)
    fg = level0.float()
    inside, outside = (err * fg).sum() / fg.sum(), (err * (1 - fg)).sum() / (1 - fg).sum()
    assert inside > 5 * outside  # the error sits where it was planted (standardizing spreads a little)
    got = fpn_masked_loss(s, t, adapters, boxes, BATCH_HW, fg_weight=0.7, bg_weight=0.2)
    torch.testing.assert_close(got, (0.7 * inside + 0.2 * outside) / len(LEVELS))
    assert fpn_masked_loss(s, t, adapters, boxes, BATCH_HW, fg_weight=0.0, bg_weight=0.0).item() == 0.0


# --- student + teacher -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair(smoke_params):
    torch.manual_seed(0)
    head = head_config(smoke_params["model"], 5)
    teacher = build_detector(preset("r18", 0.25), head)
    student = build_detector(preset("tiny", 0.25), {**head, "fpn_channels": 8})
    return student, teacher


def _batch():
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([1])} for _ in images]
    return images, targets


@pytest.mark.parametrize("kind", ["fpn", "fpn_masked", "logits"])
def test_distiller_adds_a_weighted_kd_term_with_gradients(pair, kind):
    torch.set_num_threads(1)
    student, teacher = copy.deepcopy(pair[0]).train(), copy.deepcopy(pair[1])
    d = Distiller(student, Teacher(teacher), kind, weight=2.0)
    assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training
    torch.manual_seed(0)
    losses = d.loss_fn(student, *_batch())
    assert {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg", "loss_kd"} == set(losses)
    assert losses["loss_kd"].item() > 0
    losses["loss_kd"].backward()
    assert kind == "logits" or student.backbone.fpn.layer_blocks[0][0].weight.grad.abs().sum() > 0
    if kind == "logits":
        assert student.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0
        assert len(list(d.parameters())) == 0
    else:  # student FPN 8 channels, teacher 16: adapters learn
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    # hooks were removed: a plain forward records nothing more
    assert not student.backbone._forward_hooks and not student.transform._forward_hooks


def test_distiller_kd_is_zero_when_the_student_is_the_teacher(pair):
    """Same weights, and the student's BN in eval mode (so both use running statistics)."""
    teacher = copy.deepcopy(pair[1])
    student = copy.deepcopy(teacher).train()
    for m in student.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    for kind in ("fpn", "fpn_masked", "logits"):
        d = Distiller(student, Teacher(copy.deepcopy(teacher)), kind)
        assert d.loss_fn(student, *_batch())["loss_kd"].abs().item() < 1e-6


def test_teacher_must_resize_like_the_student(pair, smoke_params):
    head = head_config({**smoke_params["model"], "min_size": 96, "max_size": 96}, 5)
    other = build_detector(preset("tiny", 0.25), head)
    with pytest.raises(JdnasError, match="min_size/max_size"):
        check_compatible(pair[0], other)
    with pytest.raises(JdnasError, match="classes"):
        check_compatible(pair[0], build_detector(preset("tiny", 0.25), {**pair[1].head_cfg, "num_classes": 3}))


def test_kd_training_updates_and_checkpoints_the_adapters(pair, prepared, smoke_params, tmp_path):
    torch.set_num_threads(1)
    student, teacher = copy.deepcopy(pair[0]), copy.deepcopy(pair[1])
    d = Distiller(student, Teacher(teacher), "fpn_masked")
    before = {k: v.clone() for k, v in d.state_dict().items()}
    ds = CocoDetection(prepared / "train.json", max_size=64)
    cfg = {**smoke_params["train_student"], "iters": 2, "checkpoint_every": 1}
    out = train_detector(student, ds, cfg, tmp_path / "s.pt", 0, torch.device("cpu"), "fp",
                         loss_fn=d.loss_fn, extra=d)
    assert "loss_kd" in out["last_losses"]
    assert any(not torch.equal(v, before[k]) for k, v in d.state_dict().items())
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    for k, v in d.state_dict().items():
        assert torch.equal(state["extra"][k], v)


def test_kd_training_resumes_exactly(pair, prepared, smoke_params, tmp_path):
    torch.set_num_threads(1)
    ds = CocoDetection(prepared / "train.json", max_size=64)
    cfg = {**smoke_params["train_student"], "iters": 3, "checkpoint_every": 1}

    def run(path, stop_after=None):
        student, teacher = copy.deepcopy(pair[0]), copy.deepcopy(pair[1])
        d = Distiller(student, Teacher(teacher), "fpn")
        train_detector(student, ds, cfg, path, 0, torch.device("cpu"), "fp", loss_fn=d.loss_fn, extra=d,
                       stop_after=stop_after)
        return student, d

    a, da = run(tmp_path / "a.pt")
    run(tmp_path / "b.pt", stop_after=1)
    b, db = run(tmp_path / "b.pt")   # a fresh process would rebuild student, teacher and adapters like this
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    for (k, va), vb in zip(da.state_dict().items(), db.state_dict().values()):
        assert torch.equal(va, vb), k
