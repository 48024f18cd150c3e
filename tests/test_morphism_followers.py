"""Followers (e.g. SGD momentum buffers) cut through every action with the weights' own indices."""
from __future__ import annotations

import pytest
import torch

from jdnas.config import defaults
from jdnas.models.arch import Head, preset
from jdnas.models.detector import build_detector, head_config
from jdnas.models.morphism import (BODY, KINDS, Action, apply_action, apply_head_action, apply_with_followers,
                            channel_importance, kept_count, legal_actions, top_channels)

WIDTH = 0.25
PRESETS = ("tiny", "r18", "r50")
BN = ("weight", "bias", "running_mean", "running_var")
# the tensors widen computes anew in each block of its stage (producers, their BNs, consumers)
WIDENED = {"basic": ["conv1.weight", *(f"bn1.{t}" for t in BN), "conv2.weight"],
           "bottleneck": ["conv1.weight", *(f"bn1.{t}" for t in BN), "conv2.weight", *(f"bn2.{t}" for t in BN),
                          "conv3.weight"]}
FRESH_KINDS = {"deepen", "shift", "widen"}
FPN, RPN, FC6 = "backbone.fpn.", "rpn.head.conv.0.0.weight", "roi_heads.box_head.fc6.weight"
RPN_HEADS = ("rpn.head.cls_logits.weight", "rpn.head.bbox_pred.weight")


@pytest.fixture(scope="module")
def cfg(smoke_params):
    return head_config(smoke_params["model"], 5)


_parents: dict = {}


def parent(name: str, cfg: dict):
    """(Arch, Head, state_dict) of a preset with random, distinct, positive float weights."""
    if name not in _parents:
        torch.manual_seed(0)
        model = build_detector(preset(name, WIDTH), cfg)
        g = torch.Generator().manual_seed(1)
        sd = {k: torch.rand(v.shape, generator=g) + 0.05 if v.is_floating_point() else v
              for k, v in model.state_dict().items()}
        _parents[name] = (model.arch, Head.of(cfg), sd)
    return _parents[name]


def actions(name: str, kind: str, cfg: dict) -> list[Action]:
    """The first and last legal action of `kind` on the preset (every kind enabled; head bounds loose)."""
    arch, head, _ = parent(name, cfg)
    base = Head(head.fpn * 2, head.rep * 2, head.min_size * 2, head.max_size * 2, head.proposals * 2)
    bounds = {**defaults()["search_space"], "actions": list(KINDS), "resize_ratios": [0.5], "min_input_ratio": 0.2}
    acts = [a for a in legal_actions(arch, bounds, head, base) if a.kind == kind]
    return sorted(set(acts[:1] + acts[-1:]), key=str)


def floats(sd: dict) -> dict:
    return {k: v.clone() for k, v in sd.items() if v.is_floating_point()}


def fresh_keys(a: Action, arch, child_arch, sd: dict, csd: dict) -> set[str]:
    """The child's keys that the action creates anew: they must be absent from every follower."""
    if a.kind in ("deepen", "shift"):
        taker = a.stage if a.kind == "deepen" or a.step == 1 else a.stage + 1
        p = f"{BODY}stages.{taker}.{child_arch.stages[taker].depth - 1}."
        return {k for k in csd if k.startswith(p) and csd[k].is_floating_point()}
    if a.kind == "widen":
        return {f"{BODY}stages.{a.stage}.{i}.{n}" for i in range(arch.stages[a.stage].depth)
                for n in WIDENED[arch.block]}
    return set()


def rows(child: torch.Tensor, par: torch.Tensor) -> torch.Tensor:
    """For each row of `child`, the index of the identical row of `par` (rows are distinct)."""
    flat = par.flatten(1)
    return torch.tensor([int((flat == r).all(1).nonzero().item()) for r in child.flatten(1)])


def storages(sd: dict) -> set[int]:
    return {v.untyped_storage().data_ptr() for v in sd.values()}


# --- the weights as their own follower -----------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", PRESETS)
def test_the_weights_as_follower_end_equal_to_the_child_weights(name, kind, cfg):
    arch, head, sd = parent(name, cfg)
    acts = actions(name, kind, cfg)
    if not acts:
        assert name == "tiny" and kind in ("shallow", "shift")  # one block per stage: nothing to remove
        pytest.skip(f"{kind} is not legal on {name}")
    for a in acts:
        fol = floats(sd)
        before = floats(fol)
        c_arch, c_head, csd, (cf,), idx = apply_with_followers(a, arch, head, sd, [fol])
        ref = apply_head_action(a, head, sd) if a.on_head else apply_action(a, arch, sd)
        assert (c_head if a.on_head else c_arch) == ref[0] and list(csd) == list(ref[1])
        assert all(torch.equal(csd[k], ref[1][k]) for k in csd)
        for k, v in cf.items():
            assert v.shape == csd[k].shape and torch.equal(v, csd[k]), (a, k)
        fresh = fresh_keys(a, arch, c_arch, sd, csd)
        assert fresh <= set(csd) and bool(fresh) == (kind in FRESH_KINDS), a
        assert set(cf) == {k for k, v in csd.items() if v.is_floating_point()} - fresh, a
        assert all(torch.equal(fol[k], before[k]) for k in fol)  # the input follower is untouched
        assert not storages(cf) & (storages(fol) | storages(sd))  # and shares nothing with the child's
        assert (idx is None) == (kind != "fpn_prune")


def test_a_partial_follower_stays_partial_and_a_misshaped_one_is_refused(cfg):
    arch, head, sd = parent("r18", cfg)
    conv1 = f"{BODY}stages.2.1.conv1.weight"
    fol = {conv1: torch.randn(sd[conv1].shape), f"{BODY}stages.2.1.bn1.running_mean": torch.zeros(0)}
    with pytest.raises(ValueError, match="follower 0"):
        apply_with_followers("prune(2,0.5)", arch, head, sd, [fol])
    _, _, csd, (cf,), _ = apply_with_followers("shallow(2,1)", arch, head, sd, [{conv1: sd[conv1].clone()}])
    assert set(cf) == set() and conv1 not in csd  # block 1 removed, nothing renamed onto it
    _, _, csd, (cf, empty), _ = apply_with_followers("prune(2,0.5)", arch, head, sd, [{conv1: sd[conv1].clone()}, {}])
    assert list(cf) == [conv1] and torch.equal(cf[conv1], csd[conv1]) and empty == {}


def test_shallow_renames_the_followers_with_the_blocks(cfg):
    arch, head, sd = parent("r50", cfg)                # 3 blocks in stage 0: block 2 becomes block 1
    k2, k1 = f"{BODY}stages.0.2.conv2.weight", f"{BODY}stages.0.1.conv2.weight"
    mom = torch.randn(sd[k2].shape)
    c_arch, _, csd, (cf,), _ = apply_with_followers("shallow(0,1)", arch, head, sd, [{k2: mom}])
    assert c_arch.depths[0] == 2 and list(cf) == [k1] and torch.equal(cf[k1], mom) and cf[k1] is not mom
    assert not storages(csd) & storages(sd)            # renamed weights are copies too


# --- a random follower is cut with the weights' indices --------------------------------------------
@pytest.mark.parametrize("name", PRESETS)
def test_a_random_follower_is_cut_by_prune_with_the_weights_indices(name, cfg):
    arch, head, sd = parent(name, cfg)
    g = torch.Generator().manual_seed(7)
    fol = {k: torch.randn(v.shape, generator=g) for k, v in sd.items() if v.is_floating_point()}
    c_arch, _, csd, (cf,), _ = apply_with_followers("prune(2,0.5)", arch, head, sd, [fol])
    links = [("conv1", "bn1", "conv2")] + ([("conv2", "bn2", "conv3")] if arch.block == "bottleneck" else [])
    w, f = dict(sd), dict(fol)                        # the parent, cut link by link as the test goes
    for i, mid in enumerate(arch.stages[2].mids):
        p = f"{BODY}stages.2.{i}."
        for prod, bn, cons in links:
            idx = rows(csd[p + prod + ".weight"], w[p + prod + ".weight"])
            imp = channel_importance(w[p + prod + ".weight"], w[p + bn + ".weight"])
            assert torch.equal(idx, top_channels(imp, kept_count(mid, 0.5)))  # the slice, recomputed
            for d in (w, f):
                for k in [p + prod + ".weight"] + [f"{p}{bn}.{t}" for t in BN]:
                    d[k] = d[k][idx]
                d[p + cons + ".weight"] = d[p + cons + ".weight"][:, idx]
    assert set(cf) == set(fol)
    for k in cf:
        assert torch.equal(cf[k], f[k]) and torch.equal(csd[k], w[k]), k


def test_fpn_prune_returns_the_kept_fpn_channels_and_cuts_a_follower_with_them(cfg):
    arch, head, sd = parent("r18", cfg)
    fol = {k: torch.randn(v.shape) for k, v in sd.items() if v.is_floating_point()}
    _, c_head, csd, (cf,), idx = apply_with_followers("fpn_prune(0.5)", arch, head, sd, [fol])
    assert idx.dtype == torch.long and len(idx) == c_head.fpn == kept_count(head.fpn, 0.5)
    assert torch.equal(idx, idx.sort().values) and len(set(idx.tolist())) == len(idx)
    for lvl in range(4):
        inner, layer = f"{FPN}inner_blocks.{lvl}.0.", f"{FPN}layer_blocks.{lvl}.0."
        assert torch.equal(csd[inner + "weight"], sd[inner + "weight"][idx])     # e.g. a KD adapter's [:, idx]
        assert torch.equal(cf[inner + "weight"], fol[inner + "weight"][idx])
        assert torch.equal(cf[layer + "weight"], fol[layer + "weight"][idx][:, idx])
        assert torch.equal(cf[layer + "bias"], fol[layer + "bias"][idx])
    o = sd[FC6].shape[0]
    assert torch.equal(cf[FC6], fol[FC6].view(o, head.fpn, -1)[:, idx].reshape(o, -1))
    ridx = rows(csd[RPN], sd[RPN][:, idx])
    assert torch.equal(cf[RPN], fol[RPN][:, idx][ridx]) and torch.equal(cf[RPN[:-6] + "bias"], fol[RPN[:-6] + "bias"][ridx])
    for k in RPN_HEADS:
        assert torch.equal(cf[k], fol[k][:, ridx])


def test_head_prune_cuts_a_follower_with_the_weights_indices(cfg):
    arch, head, sd = parent("tiny", cfg)
    fol = {k: torch.randn(v.shape) for k, v in sd.items() if v.is_floating_point()}
    _, _, csd, (cf,), idx = apply_with_followers("head_prune(0.5)", arch, head, sd, [fol])
    fc7 = "roi_heads.box_head.fc7.weight"
    idx6 = rows(csd[FC6], sd[FC6])
    idx7 = rows(csd[fc7], sd[fc7][:, idx6])
    assert idx is None and torch.equal(cf[FC6], fol[FC6][idx6]) and torch.equal(cf[fc7], fol[fc7][:, idx6][idx7])
    assert torch.equal(cf["roi_heads.box_head.fc7.bias"], fol["roi_heads.box_head.fc7.bias"][idx7])
    assert torch.equal(cf["roi_heads.box_predictor.cls_score.weight"],
                       fol["roi_heads.box_predictor.cls_score.weight"][:, idx7])


# --- the use it is for: SGD momentum across a lineage ---------------------------------------------
def test_sgd_momentum_buffers_follow_a_lineage_of_actions(cfg):
    torch.manual_seed(0)
    model = build_detector(preset("tiny", WIDTH), cfg)
    arch, head = model.arch, Head.of(cfg)
    for text in ("prune(1,0.5)", "deepen(2)", "fpn_prune(0.25)", "head_prune(0.25)"):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        params = dict(model.named_parameters())
        mom = {k: opt.state[p]["momentum_buffer"] for k, p in params.items()}
        arch, head, sd, (mom,), _ = apply_with_followers(text, arch, head, model.state_dict(), [mom])
        model = build_detector(arch, head.apply(cfg))
        model.load_state_dict(sd)
        params = dict(model.named_parameters())
        new = {k for k in params if k not in mom}
        assert bool(new) == (text == "deepen(2)") and all(k.startswith(f"{BODY}stages.2.1.") for k in new)
        assert all(mom[k].shape == params[k].shape for k in mom) and set(mom) <= set(params)
