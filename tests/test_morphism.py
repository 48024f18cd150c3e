"""Student morphism: every action on every preset, function preservation, importance-based pruning."""
from __future__ import annotations

import copy

import pytest
import torch

from jdnas.config import defaults
from jdnas.models.arch import PRESET_NAMES, Arch, preset
from jdnas.models.complexity import count_params
from jdnas.models.detector import build_detector, head_config
from jdnas.models.morphism import (BODY, Action, apply_action, child_arch, deepen, is_legal, legal_actions, prune, slim,
                            widen)

WIDTH = 0.25
SIZE = 64


@pytest.fixture(scope="module")
def head(smoke_params):
    return head_config(smoke_params["model"], 5)


def randomize(model, seed: int = 1):
    """Non-trivial BN: random gammas/betas and running stats calibrated on random images, eval mode."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(seed)
    last = {id(b.last_bn) for stage in model.backbone.body.stages for b in stage}
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            scale = 0.3 if id(m) in last else 1.0
            m.weight.data = (torch.rand(m.weight.shape, generator=g) * scale + 0.1).to(m.weight)
            m.bias.data = (torch.randn(m.bias.shape, generator=g) * 0.1).to(m.bias)
            m.momentum = None
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model.backbone(torch.rand(2, 3, SIZE, SIZE, generator=g).to(next(model.parameters())))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.1
    return model.eval()


_parents: dict = {}


def parent(name: str, head: dict, dtype=torch.float32):
    key = (name, dtype)
    if key not in _parents:
        torch.manual_seed(0)
        _parents[key] = randomize(build_detector(preset(name, WIDTH), head).to(dtype))
    return _parents[key]


def child_of(model, action, dtype=torch.float32):
    arch, sd = apply_action(action, model.arch, model.state_dict())
    child = build_detector(arch, model.head_cfg).to(dtype)
    child.load_state_dict(sd)  # strict: every key and shape of the child Arch
    return child.eval()


def test_action_strings_round_trip():
    for text in ["deepen(2)", "shallow(2,1)", "shift(1,+1)", "shift(0,-1)", "prune(2,0.25)", "slim(3,0.5)",
                 "widen(1,0.5)", "prune(0,0.3333333333333333)"]:
        a = Action.parse(text)
        assert str(a) == text and Action.parse(str(a)) == a
    assert Action.parse(" shift( 1 , 1 ) ") == Action("shift", 1, step=1)


@pytest.mark.parametrize("text", ["deepen", "deepen(4)", "deepen(1,2)", "shallow(1)", "shallow(1,0)",
                                  "shift(3,+1)", "shift(1,2)", "prune(1,1.5)", "prune(1,0)", "slim(1)",
                                  "grow(1)", "widen(1,-0.5)", "prune(1,x)"])
def test_bad_action_strings_are_rejected(text):
    with pytest.raises(ValueError):
        Action.parse(text)


# --- every action on every preset ---------------------------------------------------------------
ACTIONS = ["deepen(1)", "shallow(2,1)", "shift(1,+1)", "shift(1,-1)", "prune(2,0.5)", "slim(0,0.25)",
           "slim(2,0.25)", "widen(1,0.5)"]
GROWS = {"deepen", "widen"}


def _parent_for(name, action, head):
    """The preset, deepened first where the action needs a stage with more than one block (tiny)."""
    m = parent(name, head)
    need = {"shallow": [action.stage], "shift": [action.stage + (1 if action.step == 1 else 0)]}.get(action.kind, [])
    for s in need:
        if m.arch.stages[s].depth < 2:
            with pytest.raises(ValueError):
                apply_action(action, m.arch, m.state_dict())
            m = child_of(m, Action("deepen", s))
    return m


@pytest.mark.parametrize("text", ACTIONS)
@pytest.mark.parametrize("name", PRESET_NAMES)
def test_every_action_on_every_preset(name, text, head):
    action = Action.parse(text)
    par = _parent_for(name, action, head)
    before = {k: v.clone() for k, v in par.state_dict().items()}
    child = child_of(par, action)
    # the parent's state_dict is untouched (pure function)
    for k, v in par.state_dict().items():
        assert torch.equal(v, before[k]), k
    # the Arch moves as the action says
    assert child.arch == child_arch(action, par.arch) != par.arch
    d_par, d_child = par.arch.depths, child.arch.depths
    if action.kind == "deepen":
        assert d_child[action.stage] == d_par[action.stage] + 1
    elif action.kind == "shallow":
        assert d_child[action.stage] == d_par[action.stage] - 1
    elif action.kind == "shift":
        assert sum(d_child) == sum(d_par) and d_child[action.stage] == d_par[action.stage] + action.step
    elif action.kind in ("prune", "widen"):
        mids, new = par.arch.stages[action.stage].mids, child.arch.stages[action.stage].mids
        assert all((n > m) if action.kind == "widen" else (n < m) for m, n in zip(mids, new))
    else:
        assert child.arch.widths[action.stage] < par.arch.widths[action.stage]
    # parameter count moves the way the action says (presets widen stage by stage, so a block moved
    # to a later stage costs more)
    grows = action.kind in GROWS or (action.kind == "shift" and action.step == -1)
    assert (count_params(child) > count_params(par)) if grows else (count_params(child) < count_params(par))
    # heads are inherited as they are; the FPN lateral conv only loses input channels
    psd, csd = par.state_dict(), child.state_dict()
    lateral = f"backbone.fpn.inner_blocks.{action.stage}.0.weight" if action.kind == "slim" else None
    for k, v in psd.items():
        if k == lateral:
            assert csd[k].shape == (v.shape[0], child.arch.widths[action.stage], 1, 1)
        elif not k.startswith(BODY):
            assert torch.equal(csd[k], v), k
    # forward + backward in train mode, and an eval forward
    child.train()
    images = [torch.rand(3, SIZE, SIZE) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([1])} for _ in images]
    loss = sum(child(images, targets).values())
    loss.backward()
    grads = [p.grad for p in child.backbone.body.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    child.eval()
    with torch.no_grad():
        out = child(images)
    assert len(out) == 2 and out[0]["boxes"].shape[1] == 4


# --- function preservation ------------------------------------------------------------------------
def _outputs(model, x):
    with torch.no_grad():
        feats = model.backbone(model.transform([x])[0].tensors)
        det = model([x])[0]
    return feats, det


@pytest.mark.parametrize("text", ["deepen(0)", "deepen(2)", "deepen(3)", "widen(1,0.5)", "widen(3,0.25)"])
@pytest.mark.parametrize("name", PRESET_NAMES)
def test_deepen_and_widen_preserve_the_function(name, text, head):
    """Outputs equal the parent's within 1e-4 in eval mode: FPN features, boxes, scores, labels.

    Run in float64 so that the check measures the morphism, not float32 rounding (a float32
    check, relative to the feature scale, follows)."""
    par = parent(name, head, torch.float64)
    child = child_of(par, Action.parse(text), torch.float64)
    x = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (fa, da), (fb, db) = _outputs(par, x), _outputs(child, x)
    assert list(fa) == list(fb) == ["0", "1", "2", "3", "pool"]
    for k in fa:
        torch.testing.assert_close(fb[k], fa[k], atol=1e-4, rtol=0)
    assert len(da["boxes"]) > 0
    torch.testing.assert_close(db["boxes"], da["boxes"], atol=1e-4, rtol=0)
    torch.testing.assert_close(db["scores"], da["scores"], atol=1e-4, rtol=0)
    assert torch.equal(db["labels"], da["labels"])
    # float32: equal up to float rounding, relative to the features' scale
    par32 = parent(name, head)
    child32 = child_of(par32, Action.parse(text))
    (fa, _), (fb, _) = _outputs(par32, x.float()), _outputs(child32, x.float())
    for k in fa:
        assert (fb[k] - fa[k]).abs().max() <= 1e-4 * max(1.0, fa[k].abs().max().item())


def test_deepen_preserves_the_function_in_train_mode_too(head):
    par = parent("r18", head, torch.float64)
    child = child_of(par, Action("deepen", 2), torch.float64)
    x = torch.rand(2, 3, SIZE, SIZE, dtype=torch.float64)
    p, c = copy.deepcopy(par).train(), child.train()
    with torch.no_grad():
        fa, fb = p.backbone(x), c.backbone(x)
    for k in fa:
        torch.testing.assert_close(fb[k], fa[k], atol=1e-4, rtol=0)


def test_widen_copies_break_symmetry(head):
    """The consumer weights of a copied channel and its source differ (noise), summing to the original."""
    par = parent("r18", head)
    arch, sd = widen(par.arch, par.state_dict(), 1, 0.5)
    w = sd[f"{BODY}stages.1.0.conv2.weight"]
    mid = par.arch.stages[1].mids[0]
    assert w.shape[1] == arch.stages[1].mids[0] > mid
    copied = sd[f"{BODY}stages.1.0.conv1.weight"][mid:]
    src = [next(c for c in range(mid) if torch.equal(sd[f"{BODY}stages.1.0.conv1.weight"][c], f)) for f in copied]
    assert not torch.allclose(w[:, mid], w[:, src[0]])


# --- importance ---------------------------------------------------------------------------------
def test_prune_keeps_the_planted_most_important_channels(head):
    par = parent("r18", head)
    sd = {k: v.clone() for k, v in par.state_dict().items()}
    p = f"{BODY}stages.2.1."
    mid = par.arch.stages[2].mids[1]
    g = torch.Generator().manual_seed(3)
    wanted = torch.randperm(mid, generator=g)[: mid // 2].sort().values
    w = torch.rand(sd[p + "conv1.weight"].shape, generator=g) * 0.1
    gamma = torch.full((mid,), 1.0)
    w[wanted] *= 10            # large filters ...
    decoy = [c for c in range(mid) if c not in set(wanted.tolist())][0]
    w[decoy] *= 100            # ... but a decoy whose BN gamma is ~0: its product is the smallest
    gamma[decoy] = 1e-6
    sd[p + "conv1.weight"], sd[p + "bn1.weight"] = w, gamma
    arch, out = prune(par.arch, sd, 2, 0.5)
    assert arch.stages[2].mids[1] == mid - mid // 2
    kept = [next(c for c in range(mid) if torch.equal(sd[p + "conv1.weight"][c], f)) for f in out[p + "conv1.weight"]]
    assert kept == wanted.tolist()
    assert torch.equal(out[p + "bn1.running_mean"], sd[p + "bn1.running_mean"][wanted])
    assert torch.equal(out[p + "conv2.weight"], sd[p + "conv2.weight"][:, wanted])


def test_slim_keeps_the_planted_channels_across_the_stage_the_next_stage_and_the_fpn(head):
    par = parent("r18", head)
    sd = {k: v.clone() for k, v in par.state_dict().items()}
    out_w = par.arch.widths[1]
    wanted = torch.arange(0, out_w, 4)        # a quarter of the channels: slim(1, 0.75)
    for i in range(par.arch.stages[1].depth):
        p = f"{BODY}stages.1.{i}."
        sd[p + "bn2.weight"] = torch.full((out_w,), 0.01)
        sd[p + "bn2.weight"][wanted] = 1.0
    arch, out = slim(par.arch, sd, 1, 0.75)
    assert arch.widths[1] == len(wanted)
    fpn = "backbone.fpn.inner_blocks.1.0.weight"
    assert torch.equal(out[fpn], sd[fpn][:, wanted])
    nxt = f"{BODY}stages.2.0."
    assert torch.equal(out[nxt + "conv1.weight"], sd[nxt + "conv1.weight"][:, wanted])
    assert torch.equal(out[nxt + "downsample.0.weight"], sd[nxt + "downsample.0.weight"][:, wanted])
    assert torch.equal(out[f"{BODY}stages.1.1.conv1.weight"], sd[f"{BODY}stages.1.1.conv1.weight"][:, wanted])
    assert torch.equal(out[f"{BODY}stages.1.0.downsample.1.running_var"],
                       sd[f"{BODY}stages.1.0.downsample.1.running_var"][wanted])


def test_slim_of_stage_0_keeps_the_stem_consistent(head):
    r18 = parent("r18", head)  # stem feeds stage 0's identity shortcut: the stem is slimmed with it
    arch, _ = slim(r18.arch, r18.state_dict(), 0, 0.25)
    assert arch.stem == arch.widths[0] == 12
    r50 = build_detector(Arch.parse("B16:1x32m8-1x64m16-1x128m32-1x256m64"), head)
    arch, sd = slim(r50.arch, r50.state_dict(), 0, 0.5)  # 32 -> 16 would equal the stem: one more kept
    assert arch.stem == 16 and arch.widths[0] == 17
    build_detector(arch, head).load_state_dict(sd)


def test_deepen_is_deterministic_and_seeded(head):
    par = parent("tiny", head)
    a = deepen(par.arch, par.state_dict(), 1, seed=0)[1]
    b = deepen(par.arch, par.state_dict(), 1, seed=0)[1]
    c = deepen(par.arch, par.state_dict(), 1, seed=1)[1]
    k = f"{BODY}stages.1.1.conv1.weight"
    assert torch.equal(a[k], b[k]) and not torch.equal(a[k], c[k])
    assert torch.equal(a[f"{BODY}stages.1.1.bn2.weight"], torch.zeros_like(a[f"{BODY}stages.1.1.bn2.weight"]))


# --- the legal action space -----------------------------------------------------------------------
def bounds(**kw):
    return {**defaults()["search_space"], **kw}


def test_legal_actions_follow_the_bounds():
    tiny = preset("tiny", 0.5)                     # S16:1x16m16-1x32m32-1x64m64-1x128m128
    acts = legal_actions(tiny, bounds())
    kinds = {a.kind for a in acts}
    assert kinds == {"deepen", "prune", "slim"}  # depth 1 everywhere: nothing to remove or shift; widen off
    assert Action("prune", 0, ratio=0.5) in acts and Action("prune", 0, ratio=0.25) in acts
    assert Action("prune", 0, ratio=0.5) not in legal_actions(tiny, bounds(min_width=9))
    assert not any(a.kind == "deepen" for a in legal_actions(tiny, bounds(max_depth=[1, 1, 1, 1])))
    assert Action("widen", 2, ratio=0.5) in legal_actions(tiny, bounds(actions=["widen"], max_width=96))
    assert Action("widen", 3, ratio=0.5) not in legal_actions(tiny, bounds(actions=["widen"], max_width=96))
    r34 = preset("r34", 0.25)
    acts = legal_actions(r34, bounds(min_depth=[3, 1, 1, 1], max_depth=[3, 4, 12, 4]))
    # depths 3-4-6-3 within min 3-1-1-1 / max 3-4-12-4: stage 0 is fixed, stage 1 cannot grow
    assert Action("shallow", 0, index=1) not in acts and Action("deepen", 1) not in acts
    assert Action("shift", 0, step=1) not in acts and Action("shift", 0, step=-1) not in acts
    assert Action("shift", 1, step=1) not in acts and Action("shift", 1, step=-1) in acts
    assert Action("shallow", 2, index=5) in acts and Action("deepen", 2) in acts
    assert len(acts) == len(set(acts))


def test_every_legal_action_applies(head):
    par = parent("r34", head)
    acts = legal_actions(par.arch, bounds(actions=["deepen", "shallow", "shift", "prune", "slim", "widen"]))
    assert {a.kind for a in acts} == {"deepen", "shallow", "shift", "prune", "slim", "widen"}
    for a in acts:
        arch, sd = apply_action(a, par.arch, par.state_dict())
        assert arch == child_arch(a, par.arch) and is_legal(a, par.arch, bounds(actions=[a.kind]))
        assert sd[f"{BODY}stem.conv.weight"].shape[0] == arch.stem


# --- head actions ------------------------------------------------------------------------------
HEAD_ACTIONS = ["fpn_prune(0.5)", "head_prune(0.25)", "resize(0.5)", "proposals(0.5)"]


@pytest.mark.parametrize("text", HEAD_ACTIONS)
@pytest.mark.parametrize("name", PRESET_NAMES)
def test_every_head_action_on_every_preset(name, text, head):
    from jdnas.models.arch import Head
    from jdnas.models.morphism import child_head, morph_detector
    action = Action.parse(text)
    assert str(action) == text and action.on_head
    par = parent(name, head)
    before = {k: v.clone() for k, v in par.state_dict().items()}
    child = morph_detector(par, action).eval()
    for k, v in par.state_dict().items():
        assert torch.equal(v, before[k]), k
    h_par, h_child = Head.of(par.head_cfg), Head.of(child.head_cfg)
    assert h_child == child_head(action, h_par) != h_par and child.arch == par.arch
    assert child.backbone.out_channels == h_child.fpn
    assert child.transform.min_size == (h_child.min_size,) and child.roi_heads.box_head.fc6.out_features == h_child.rep
    with torch.no_grad():
        out = child([torch.rand(3, SIZE, SIZE)])
    assert out[0]["boxes"].shape[1] == 4


def test_head_actions_keep_the_most_important_channels(head):
    from jdnas.models.arch import Head
    from jdnas.models.morphism import fpn_prune, head_prune
    par = parent("tiny", head)
    sd = par.state_dict()
    h = Head.of(par.head_cfg)
    _, out = fpn_prune(h, sd, 0.5)
    writes = sum(sd[f"backbone.fpn.{b}.{i}.0.weight"].abs().flatten(1).sum(1)
                 for b in ("inner_blocks", "layer_blocks") for i in range(4))
    fc6 = sd["roi_heads.box_head.fc6.weight"].abs()
    reads = (sd["rpn.head.conv.0.0.weight"].abs().sum((0, 2, 3)) / h.fpn
             + fc6.view(fc6.shape[0], h.fpn, -1).sum((0, 2)) / fc6.shape[0])
    kept = torch.topk(writes * reads, h.fpn // 2).indices.sort().values
    assert torch.equal(out["backbone.fpn.inner_blocks.2.0.weight"], sd["backbone.fpn.inner_blocks.2.0.weight"][kept])
    _, out = head_prune(h, sd, 0.5)
    assert out["roi_heads.box_head.fc6.weight"].shape == (h.rep // 2, h.fpn * 49)
    assert out["roi_heads.box_predictor.cls_score.weight"].shape[1] == h.rep // 2


def test_head_actions_follow_the_bounds():
    from jdnas.models.arch import Head
    base = Head(64, 256, 128, 128, 100)
    acts = legal_actions(preset("tiny", 0.5), bounds(), base, base)
    assert {str(a) for a in acts if a.on_head} == {"fpn_prune(0.25)", "fpn_prune(0.5)", "head_prune(0.25)",
                                                    "head_prune(0.5)", "resize(0.75)", "proposals(0.5)"}
    small = Head(16, 64, 64, 64, 25)       # every head setting at its bound
    assert not [a for a in legal_actions(preset("tiny", 0.5), bounds(), small, base) if a.on_head]
    assert legal_actions(preset("tiny", 0.5), bounds()) == [a for a in acts if not a.on_head]
    with pytest.raises(ValueError):
        Action("fpn_prune", 1, ratio=0.5)
    assert Action.parse("resize(0.75)") == Action("resize", ratio=0.75)
