"""The elastic teacher pool: dynamic ops, extraction, channel sorting, schedule, resume, stages."""
from __future__ import annotations

import csv
import random

import pytest
import torch

from jdnas.config import load_params
from jdnas.data.dataset import CocoDetection
from jdnas.errors import ConfigError, JdnasError
from jdnas.joint.teacher_pool import (TeacherPool, eval_teacher_pool, load_supernet, phase_at, phase_starts,
                                recalibrate_bn, sample_members, sandwich, save_supernet, train_supernet,
                                train_teacher_pool)
from jdnas.models.arch import Arch, Stage, preset
from jdnas.models.detector import build_detector, head_config, load_detector, save_detector
from jdnas.models.elastic import DynamicBatchNorm2d, PoolSpace, Supernet, channel_groups, sort_channels
from conftest import REPO, write_yaml

IMAGES = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
TARGETS = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 40.0]]), "labels": torch.tensor([1])},
           {"boxes": torch.tensor([[10.0, 8.0, 20.0, 20.0], [30.0, 30.0, 46.0, 60.0]]), "labels": torch.tensor([2, 1])}]


def _space(name: str, elastic_out: bool = True) -> PoolSpace:
    out = (0.5, 0.75, 1.0) if elastic_out else (1.0,)
    return PoolSpace(preset(name, 0.25), (1, 1, 1, 1), (0.5, 0.75, 1.0), out)


def _trained_supernet(space: PoolSpace, smoke_params: dict, steps: int = 3) -> Supernet:
    """A supernet after a few sandwich-like steps, so weights and BN statistics are not at init."""
    torch.manual_seed(0)
    sn = Supernet(space, head_config(smoke_params["model"], 3))
    opt = torch.optim.SGD(sn.model.parameters(), lr=0.01)
    rng = random.Random(0)
    sn.model.train()
    for _ in range(steps):
        for arch in (space.largest(), space.smallest(), space.sample(rng)):
            sn.set_active(arch)
            sum(sn.model(IMAGES, TARGETS).values()).backward()
        opt.step()
        opt.zero_grad()
    return sn


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.mark.parametrize("name", ["r18", "r50"])
def test_extract_computes_what_the_active_supernet_computes(name, smoke_params, tmp_path):
    space = _space(name)
    sn = _trained_supernet(space, smoke_params)
    sn.model.eval()
    rng = random.Random(1)
    members = [space.smallest(), space.middle()] + [space.sample(rng) for _ in range(4)]
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(9))
    for arch in members:
        sn.set_active(arch)
        static = sn.extract(arch).eval()
        assert static.arch == arch and type(static).__name__ == "Detector"
        with torch.no_grad():
            fa, fb = sn.model.backbone(x), static.backbone(x)
            da, db = sn.model(IMAGES), static(IMAGES)
        for k in fa:
            torch.testing.assert_close(fa[k], fb[k], atol=1e-5, rtol=0)
        for a, b in zip(da, db):
            assert a["boxes"].shape == b["boxes"].shape
            torch.testing.assert_close(a["boxes"], b["boxes"], atol=1e-5, rtol=0)
            torch.testing.assert_close(a["scores"], b["scores"], atol=1e-5, rtol=0)
    # an extracted member is a plain detector checkpoint: it loads without the supernet
    save_detector(tmp_path / "m.pt", static)
    loaded = load_detector(tmp_path / "m.pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded.backbone(x)["pool"], fb["pool"])


def test_supernet_weights_are_those_of_a_static_largest_member(smoke_params):
    space = _space("r18")
    torch.manual_seed(3)
    sn = Supernet(space, head_config(smoke_params["model"], 3))
    torch.manual_seed(3)
    static = build_detector(space.max_arch, head_config(smoke_params["model"], 3))
    assert list(sn.state_dict()) == list(static.state_dict())
    for (k, a), b in zip(sn.state_dict().items(), static.state_dict().values()):
        assert torch.equal(a, b), k  # same init as a standalone largest member with the same seed
    static.load_state_dict(sn.state_dict())  # strict: same keys, same shapes


@pytest.mark.parametrize("base, pool", [("r18", "r34"), ("r50", "r101")])
def test_inherit_makes_the_largest_member_compute_the_base(base, pool, smoke_params):
    space = PoolSpace(preset(pool, 0.25), (1, 1, 1, 1), (0.5, 1.0))
    arch = preset(base, 0.25)
    spec = arch.stages[1]
    arch = arch.with_stage(1, Stage(spec.out, (spec.mids[0] // 2,) + spec.mids[1:]))  # a narrower block too
    torch.manual_seed(0)
    detector = build_detector(arch, head_config(smoke_params["model"], 3))
    for m in detector.modules():  # non-trivial BN statistics and gains, as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0), m.weight.data.uniform_(0.5, 1.5)
    detector.eval()
    sn = Supernet(space, head_config(smoke_params["model"], 3))
    sn.inherit(arch, detector.state_dict())
    sn.model.eval()
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(9))
    for member in (space.largest(), space.member(arch.depths)):  # any member that contains the base
        sn.set_active(member)
        with torch.no_grad():
            fa, fb = sn.model.backbone(x), detector.backbone(x)
            da, db = sn.model(IMAGES), detector(IMAGES)
        for k in fb:
            torch.testing.assert_close(fa[k], fb[k], atol=1e-5, rtol=1e-5)
        for a, b in zip(da, db):
            torch.testing.assert_close(a["boxes"], b["boxes"], atol=1e-4, rtol=0)
    # the silent channels and identity blocks still learn: they get gradients
    sn.set_active(space.largest())
    sn.model.train()
    sum(sn.model(IMAGES, TARGETS).values()).backward()
    extra = sn.body.stages[2][arch.depths[2]]
    assert extra.last_bn.weight.grad.abs().sum() > 0
    assert sn.body.stages[1][0].conv2.weight.grad[:, arch.stages[1].mids[0]:].abs().sum() > 0


def test_inherit_rejects_a_detector_outside_the_pool(smoke_params):
    space = PoolSpace(preset("r18", 0.25), (1, 1, 1, 1))
    sn = Supernet(space, head_config(smoke_params["model"], 3))
    with pytest.raises(ValueError, match="not a sub-network"):
        sn.inherit(preset("r34", 0.25), build_detector(preset("r34", 0.25), head_config(smoke_params["model"], 3))
                   .state_dict())
    narrow = preset("r18", 0.125)
    with pytest.raises(ValueError, match="not a sub-network|output widths"):
        sn.inherit(narrow, {})


def test_dynamic_bn_updates_only_the_active_channels():
    bn = DynamicBatchNorm2d(8).train()
    bn(torch.randn(4, 5, 3, 3) * 3 + 2)
    assert not torch.equal(bn.running_mean[:5], torch.zeros(5))
    assert torch.equal(bn.running_mean[5:], torch.zeros(3)) and torch.equal(bn.running_var[5:], torch.ones(3))


def test_set_active_rejects_non_members(smoke_params):
    sn = Supernet(_space("r18"), head_config(smoke_params["model"], 3))
    bigger = preset("r34", 0.25)
    with pytest.raises(ValueError, match="not a member"):
        sn.set_active(bigger)
    with pytest.raises(ValueError, match="not a member"):
        sn.extract(preset("r18", 0.5))


def test_space_members_and_shortcut_rule():
    basic = _space("r18")  # stem 16 == C2 16: stage 0 has an identity shortcut, its width cannot shrink
    assert basic.out_choices(0) == [1.0] and basic.out_choices(1) == [0.5, 0.75, 1.0]
    bott = _space("r50")  # stem 16, C2 64: projection; 0.25 would make C2 == stem and drop it
    bott = PoolSpace(bott.max_arch, (1, 1, 1, 1), (0.5, 1.0), (0.25, 0.5, 1.0))
    assert bott.out_choices(0) == [0.5, 1.0]
    for space in (basic, bott):
        rng = random.Random(0)
        samples = [space.sample(rng, "width") for _ in range(50)]
        assert all(space.contains(a) for a in samples)
        assert len(set(samples)) > 40
        small = space.smallest()
        assert small.depths == space.min_depths
        assert all(space.contains(a) for a in (space.largest(), space.middle(), small))
        assert len({space.largest(), space.middle(), small}) == 3
        assert PoolSpace.from_json(space.to_json()) == space
    assert not basic.contains(preset("r34", 0.25))
    with pytest.raises(ValueError, match="min_depths"):
        PoolSpace(preset("r18", 0.25), (1, 3, 1, 1))


def test_sort_channels_keeps_the_largest_member_and_moves_momentum(smoke_params):
    space = _space("r50")
    sn = _trained_supernet(space, smoke_params)
    opt = torch.optim.SGD(sn.model.parameters(), lr=0.1, momentum=0.9)
    sn.set_active(space.largest())
    sum(sn.model(IMAGES, TARGETS).values()).backward()
    opt.step()
    sn.model.eval()
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = sn.model.backbone(x)
    conv = sn.body.stages[0][0].conv1  # reads the stem (never permuted); its rows are a mid group
    old_w, old_buf = conv.weight.detach().clone(), opt.state[conv.weight]["momentum_buffer"].clone()
    assert sort_channels(sn, opt) > 0
    with torch.no_grad():
        after = sn.model.backbone(x)
    for k in before:
        torch.testing.assert_close(before[k], after[k], atol=1e-4, rtol=1e-4)
    for group in channel_groups(sn, stage_widths=True):
        imp = group.importance()
        assert torch.all(imp[:-1] >= imp[1:]), "channels are not sorted by importance"
    # the momentum buffer followed its weight rows: find each new row among the old ones
    new_w, new_buf = conv.weight.detach(), opt.state[conv.weight]["momentum_buffer"]
    for i in range(new_w.shape[0]):
        j = int(((old_w - new_w[i]).abs().flatten(1).sum(1)).argmin())
        assert torch.equal(old_w[j], new_w[i]) and torch.equal(old_buf[j], new_buf[i])
    assert sort_channels(sn, opt) == 0  # sorted already


def _cfg(smoke_params: dict, **kw) -> dict:
    return {**smoke_params["teacher_pool"]["train"], **kw}


def test_phase_schedule(smoke_params):
    cfg = _cfg(smoke_params, iters=20, depth_phase_start=0.25, width_phase_start=0.6)
    assert phase_starts(cfg) == (5, 12)
    assert [phase_at(i, cfg) for i in (0, 4, 5, 11, 12, 19)] == ["full", "full", "depth", "depth", "width", "width"]
    assert phase_at(0, {**cfg, "depth_phase_start": 0.0, "width_phase_start": 0.0}) == "width"


def test_sandwich_sampling(smoke_params):
    space = _space("r18")
    cfg = _cfg(smoke_params, iters=20, depth_phase_start=0.25, width_phase_start=0.6, sandwich_random=3)
    assert sandwich(space, 0, cfg, seed=0) == [("largest", space.largest())]
    full_widths = space.largest()
    for it in range(5, 12):  # depth phase: depths vary, widths stay full
        members = sandwich(space, it, cfg, seed=0)
        assert [r for r, _ in members] == ["largest", "smallest", "random", "random", "random"]
        assert members[1][1].depths == space.min_depths
        for _, a in members:
            assert a.widths == full_widths.widths
            assert all(m == full_widths.stages[s].mids[0] for s, st in enumerate(a.stages) for m in st.mids)
    widths = set()
    for it in range(12, 20):
        members = sandwich(space, it, cfg, seed=0)
        assert members[1][1] == space.smallest("width")
        assert all(space.contains(a) for _, a in members)
        widths |= {a.stages[2].mids[0] for _, a in members[2:]}
    assert len(widths) > 1
    assert sandwich(space, 15, cfg, seed=0) == sandwich(space, 15, cfg, seed=0)  # a function of (seed, it)
    assert sandwich(space, 15, cfg, seed=0) != sandwich(space, 15, cfg, seed=1)


def test_sample_members_has_largest_smallest_and_is_distinct():
    space = _space("r18")
    members = sample_members(space, 6, seed=0)
    roles = [r for r, _ in members]
    assert roles[:3] == ["largest", "smallest", "middle"] and len(members) == 6
    assert len({a for _, a in members}) == 6


def test_training_resumes_exactly_across_the_width_phase(prepared, smoke_params, tmp_path):
    space = PoolSpace(Arch.parse("S8:2x8m8-2x16m16-1x32m32-1x64m64"), (1, 1, 1, 1), (0.5, 1.0), (0.5, 1.0))
    cfg = _cfg(smoke_params, iters=6, depth_phase_start=0.3, width_phase_start=0.6, checkpoint_every=1)
    ds = CocoDetection(prepared / "train.json", max_size=64)
    head = head_config(smoke_params["model"], ds.labels.num_classes)
    cpu = torch.device("cpu")

    def fresh() -> Supernet:
        torch.manual_seed(0)
        return Supernet(space, head)

    a = fresh()
    out = train_supernet(a, ds, cfg, tmp_path / "a.pt", seed=1, device=cpu, fingerprint="x")
    assert out["iters"] == 6 and out["channels_sorted"] and out["cpu_seconds"] > 0
    for stop in (3, 5):  # before and after the channel sort at iteration 4
        state = tmp_path / f"b{stop}.pt"
        out = train_supernet(fresh(), ds, cfg, state, seed=1, device=cpu, fingerprint="x", stop_after=stop)
        assert out["iters"] == stop
        assert torch.load(state, weights_only=True)["channels_sorted"] == (stop > 4)
        c = fresh()  # a new process rebuilds the supernet like this
        out = train_supernet(c, ds, cfg, state, seed=1, device=cpu, fingerprint="x")
        assert out["iters"] == 6
        for (k, va), vc in zip(a.state_dict().items(), c.state_dict().values()):
            assert torch.equal(va, vc), (stop, k)
    out = train_supernet(fresh(), ds, {**cfg, "iters": 1}, tmp_path / "b3.pt", seed=1, device=cpu, fingerprint="y")
    assert out["iters"] == 1  # a state written for other params is not resumed


def test_recalibrate_bn_uses_plain_batch_statistics(prepared, smoke_params):
    ds = CocoDetection(prepared / "train.json", max_size=64)
    model = build_detector(preset("tiny", 0.25), head_config(smoke_params["model"], ds.labels.num_classes))
    recalibrate_bn(model, ds, batches=1, batch_size=3, seed=5, device=torch.device("cpu"))
    assert not model.training
    from jdnas.data.dataset import IterationSampler
    batch = next(iter(IterationSampler(len(ds), 3, 1, 5, flip=False)))
    images = [ds[i][0] for i in batch]
    with torch.no_grad():
        x = model.transform(images)[0].tensors
        y = model.backbone.body.stem.conv(x)
    bn = model.backbone.body.stem.bn
    torch.testing.assert_close(bn.running_mean, y.mean((0, 2, 3)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bn.running_var, y.var((0, 2, 3), unbiased=True), atol=1e-4, rtol=1e-4)


def test_stages_on_smoke_config(prepared, smoke_params, base_ckpt, tmp_path):
    summary = train_teacher_pool(smoke_params, prepared, tmp_path / "pool", base_ckpt)
    assert summary["iters"] == smoke_params["teacher_pool"]["train"]["iters"] and summary["channels_sorted"]
    assert (tmp_path / "pool" / "supernet.pt").is_file() and not (tmp_path / "pool" / "train_state.pt").exists()
    sn = load_supernet(tmp_path / "pool" / "supernet.pt")
    assert str(sn.space.largest()) == summary["largest"]
    rows = eval_teacher_pool(smoke_params, prepared, tmp_path / "pool" / "supernet.pt", tmp_path / "pool" / "pool.csv")
    with open(tmp_path / "pool" / "pool.csv") as f:
        on_disk = list(csv.DictReader(f))
    assert list(on_disk[0]) == ["arch", "role", "AP", "AP50", "params", "flops", "latency_ms"]
    assert len(on_disk) == len(rows) == smoke_params["teacher_pool"]["eval"]["sample_size"]
    roles = {r["role"]: r for r in on_disk}
    assert roles["largest"]["arch"] == summary["largest"] and roles["smallest"]["arch"] == summary["smallest"]
    assert int(roles["largest"]["params"]) > int(roles["smallest"]["params"])
    assert int(roles["largest"]["flops"]) > int(roles["smallest"]["flops"])
    assert all(float(r["latency_ms"]) > 0 and 0 <= float(r["AP"]) <= 100 for r in on_disk)
    ev = smoke_params["teacher_pool"]["eval"]
    pool = TeacherPool.load(tmp_path / "pool" / "supernet.pt", prepared, ev["bn_batches"], ev["bn_batch_size"],
                            smoke_params["seed"], torch.device("cpu"))
    teacher = pool.teacher(pool.space.middle())
    assert not teacher.training and teacher.arch == pool.space.middle()
    save_detector(tmp_path / "static.pt", teacher)
    with pytest.raises(JdnasError, match="not a jdnas-supernet/1"):
        load_supernet(tmp_path / "static.pt")


def test_supernet_checkpoint_round_trip(smoke_params, tmp_path):
    sn = _trained_supernet(_space("r18"), smoke_params, steps=1)
    save_supernet(tmp_path / "s.pt", sn, note="x")
    back = load_supernet(tmp_path / "s.pt")
    assert back.space == sn.space and back.meta == {"note": "x"}
    for (k, a), b in zip(sn.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("alter, words", [
    (lambda c: c.pop("space"), "space: missing from the supernet checkpoint"),
    (lambda c: c.update(space={"base": "nonsense"}), "space: not a valid pool space"),
    (lambda c: c["state_dict"].pop(next(iter(c["state_dict"]))), "state_dict: does not match its space"),
    (lambda c: c.update(format="jdnas-detector/1"), "format: not a jdnas-supernet/1 checkpoint"),
])
def test_an_altered_supernet_is_a_one_line_error(smoke_params, tmp_path, alter, words):
    save_supernet(tmp_path / "s.pt", _trained_supernet(_space("r18"), smoke_params, steps=1))
    ckpt = torch.load(tmp_path / "s.pt", weights_only=True)
    alter(ckpt)
    torch.save(ckpt, tmp_path / "s.pt")
    with pytest.raises(JdnasError, match=words) as e:
        load_supernet(tmp_path / "s.pt")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("override, message", [
    ({"teacher_pool": {"space": {"min_depths": [1, 1, 1]}}}, "teacher_pool.space.min_depths"),
    ({"teacher_pool": {"space": {"min_depths": [1, 9, 1, 1]}}}, "teacher_pool.space.min_depths"),
    ({"teacher_pool": {"space": {"width_ratios": [0.0, 1.0]}}}, "ratios must be > 0"),
    ({"teacher_pool": {"train": {"depth_phase_start": 0.8, "width_phase_start": 0.5}}}, "depth_phase_start"),
    ({"device": "cuda:1", "teacher_pool": {"train": {"gpus": 2}}}, "needs device: cuda"),
    ({"teacher_pool": {"space": {"base": "r999"}}}, "teacher_pool.space.base"),
])
def test_bad_pool_params_are_clear_errors(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_params([REPO / "params.yaml", write_yaml(tmp_path / "bad.yaml", override)])


@pytest.mark.slow
def test_ddp_code_path_with_two_cpu_processes(prepared, base_ckpt, tmp_path, capfd):
    """The torchrun relaunch with 2 gloo processes: sharded batches, averaged gradients (the ranks'
    weights are checked to be equal at the end), only rank 0 writes. (No multi-GPU machine here.)"""
    from jdnas.engine.dist import relaunch_with_torchrun
    rc = relaunch_with_torchrun(2, ["train-teacher-pool", "--data", str(prepared), "--out", str(tmp_path / "ddp"),
                                    "--base", str(base_ckpt),
                                    "--threads", "1", "--params", str(REPO / "params.yaml"),
                                    "--params", str(REPO / "config" / "smoke.yaml")])
    out, err = capfd.readouterr()
    assert rc == 0, out[-2000:] + err[-3000:]
    assert out.count('"world_size": 2') == 1  # one summary: rank 0's
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["supernet.pt", "tb"]
    assert len(list((tmp_path / "ddp" / "tb").iterdir())) == 1  # rank 0's event file
    sn = load_supernet(tmp_path / "ddp" / "supernet.pt")
    assert sn.meta["world_size"] == 2 and sn.meta["iters"] == 6


@pytest.mark.slow
def test_stage_resumes_after_kill(prepared, base_ckpt, tmp_path):
    """SIGKILL the CLI mid-run; the rerun resumes from the state and ends where an uninterrupted run ends."""
    import os
    import signal
    import subprocess
    import time
    from conftest import cli_env
    # long enough that the kill lands mid-run on a fast or a loaded machine alike
    write_yaml(tmp_path / "long.yaml", {"teacher_pool": {"train": {"iters": 120, "checkpoint_every": 2}}})
    files = ["--params", str(REPO / "params.yaml"), "--params", str(REPO / "config" / "smoke.yaml"),
             "--params", str(tmp_path / "long.yaml")]

    def cmd(out: str) -> list[str]:
        return ["jdnas", "train-teacher-pool", "--data", str(prepared), "--base", str(base_ckpt),
                "--out", str(tmp_path / out), "--threads", "1", *files]

    from jdnas.config import load_params
    from jdnas.joint.teacher_pool import phase_starts
    _, width_start = phase_starts(load_params(files[1::2])["teacher_pool"]["train"])
    assert width_start + 2 < 120
    proc = subprocess.Popen(cmd("pool"), env=cli_env(), start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    state = tmp_path / "pool" / "train_state.pt"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and torch.load(state, weights_only=True)["iter"] >= width_start + 2:  # in the width phase
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "pool" / "supernet.pt").exists()
    killed = torch.load(state, weights_only=True)
    assert 0 < killed["iter"] < 120 and killed["channels_sorted"] == (killed["iter"] > width_start)
    r = subprocess.run(cmd("pool"), env=cli_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming from {state} at iteration" in r.stderr
    subprocess.run(cmd("ref"), env=cli_env(), capture_output=True, text=True, check=True)
    a = torch.load(tmp_path / "pool" / "supernet.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "ref" / "supernet.pt", weights_only=True)["state_dict"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
