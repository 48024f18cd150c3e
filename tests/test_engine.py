import json
import math

import pytest
import torch

from jdnas.baselines.base import train_base
from jdnas.data.dataset import CocoDetection
from jdnas.engine.device import resolve_device
from jdnas.engine.loop import LoopHooks, coco_metrics, evaluate, lr_factor, train_detector, train_loop
from jdnas.errors import JdnasError
from jdnas.models.arch import Arch, resolve_arch
from jdnas.models.detector import (HEAD_KEYS, build_detector, head_config, jittered_input, load_detector,
                                   read_checkpoint, save_detector, snap_size)
from conftest import with_overrides


def test_lr_schedules():
    cfg = {"iters": 100, "warmup_iters": 10, "schedule": "cosine", "steps": [0.5, 0.8]}
    assert lr_factor(0, cfg) == pytest.approx(0.001)
    assert lr_factor(5, cfg) < lr_factor(9, cfg) < 1.0
    assert lr_factor(50, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    step = {**cfg, "schedule": "step"}
    assert lr_factor(40, step) == 1.0 and lr_factor(60, step) == pytest.approx(0.1)
    assert lr_factor(90, step) == pytest.approx(0.01)
    assert lr_factor(70, {**cfg, "schedule": "constant"}) == 1.0


def test_missing_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("machine has CUDA")
    with pytest.raises(JdnasError, match="no CUDA device"):
        resolve_device("cuda:0")


def test_coco_metrics_perfect_and_empty(prepared):
    gt = json.loads((prepared / "val.json").read_text())
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in gt["annotations"]]
    m = coco_metrics(prepared / "val.json", perfect)
    assert m["AP"] == pytest.approx(100.0) and m["AP50"] == pytest.approx(100.0)
    wrong = [{**d, "category_id": 1 + d["category_id"] % 4} for d in perfect]
    assert coco_metrics(prepared / "val.json", wrong)["AP"] < 100.0
    assert coco_metrics(prepared / "val.json", [])["AP"] == 0.0


def _model(params, n_classes):
    torch.manual_seed(0)
    return build_detector(resolve_arch(params["model"]["base"], params["model"]["width"]),
                          head_config(params["model"], n_classes))


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(prepared, smoke_params, tmp_path):
    torch.set_num_threads(1)
    cfg = {**smoke_params["train_base"], "iters": 6, "checkpoint_every": 2, "scales": [0.5, 1.0]}
    ds = CocoDetection(prepared / "train.json", max_size=64)
    a = _model(smoke_params, ds.labels.num_classes)
    train_detector(a, ds, cfg, tmp_path / "a.pt", seed=1, device=torch.device("cpu"), fingerprint="x")
    b = _model(smoke_params, ds.labels.num_classes)
    out = train_detector(b, ds, cfg, tmp_path / "b.pt", seed=1, device=torch.device("cpu"), fingerprint="x",
                         stop_after=3)
    assert out["iters"] == 3
    assert torch.load(tmp_path / "b.pt", weights_only=True)["iter"] == 3
    c = _model(smoke_params, ds.labels.num_classes)  # a fresh process would rebuild the model like this
    first = out["cpu_seconds"]
    out = train_detector(c, ds, cfg, tmp_path / "b.pt", seed=1, device=torch.device("cpu"), fingerprint="x")
    assert out["iters"] == 6
    # compute bookkeeping survives the resume: the first process's CPU-seconds are counted
    assert first > 0 and out["resumed_cpu_seconds"] == pytest.approx(first, abs=0.01) and out["cpu_seconds"] > first
    for (k, va), vc in zip(a.state_dict().items(), c.state_dict().values()):
        assert torch.equal(va, vc), k
    # a state written for other params is not resumed
    d = _model(smoke_params, ds.labels.num_classes)
    out = train_detector(d, ds, {**cfg, "iters": 1}, tmp_path / "b.pt", seed=1, device=torch.device("cpu"),
                         fingerprint="other")
    assert out["iters"] == 1


class _Counting(LoopHooks):
    """Counts steps in its own saved state and logs the count; the step's "hidden" term stays off the bar."""

    hidden = ("hidden",)

    def __init__(self):
        self.steps = 0

    def before_step(self, it, optimizer):
        self.steps += 1

    def state(self):
        return {"steps": self.steps}

    def load_state(self, state):
        self.steps = state["steps"]

    def log_values(self, step):
        return {"steps": float(self.steps)}


class _Rows:
    def __init__(self):
        self.rows = {}

    def start(self, step, total):
        pass

    def add(self, it, values):
        self.rows[it] = dict(values)

    def flush(self):
        pass


def test_train_loop_resumes_a_step_exactly_and_logs_what_it_returns(prepared, smoke_params, tmp_path):
    """A trivial step (a linear model on the images' channel means, noise from torch's global RNG as
    RPN sampling draws it): killed after 3 iterations and resumed, the loop ends with the weights and
    hook state of an uninterrupted run; every returned term reaches the log, the hidden one only there."""
    ds = CocoDetection(prepared / "train.json", max_size=64)
    cfg = {**smoke_params["train_base"], "iters": 6, "checkpoint_every": 2}
    cpu = torch.device("cpu")

    def run(path, stop_after=None):
        torch.manual_seed(0)
        model, hooks, log, returned = torch.nn.Linear(3, 1), _Counting(), _Rows(), {}

        def step(it, images, targets, forward):
            x = torch.stack([im.mean((1, 2)) for im in images]) + 0.1 * torch.rand(len(images), 3)
            loss = (forward(x) - 1).pow(2).mean()
            loss.backward()
            returned[it] = {"loss_fit": loss.item(), "hidden": 2 * loss.item()}
            return {"loss_fit": loss.detach(), "hidden": 2 * loss.detach()}
        out = train_loop(model, ds, cfg, path, 1, cpu, step, hooks, fingerprint="x", stop_after=stop_after, log=log)
        return model, hooks, log, returned, out

    a, ha, log, returned, out = run(tmp_path / "a.pt")
    assert out["iters"] == 6 and ha.steps == 6 and set(out["last_losses"]) == {"loss_fit"}
    assert sorted(log.rows) == list(range(6))
    for it, values in returned.items():
        assert log.rows[it] == {**values, "lr": pytest.approx(cfg["lr"] * lr_factor(it, cfg)), "steps": it + 1}
    _, _, _, _, out = run(tmp_path / "b.pt", stop_after=3)
    assert out["iters"] == 3 and torch.load(tmp_path / "b.pt", weights_only=True)["steps"] == 3
    b, hb, log, _, out = run(tmp_path / "b.pt")
    assert out["iters"] == 6 and hb.steps == 6 and sorted(log.rows) == [3, 4, 5]
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_a_replanned_schedule_is_followed_capped_and_resumed(prepared, smoke_params, tmp_path):
    """`replan` is asked at every checkpoint; the loop trains to its answer (at most REPLAN_CAP x
    the plan, at least one more iteration; past the schedule's half, only a shorter one), the lr
    follows the new length, and a resumed run keeps it."""
    from jdnas.engine.loop import REPLAN_CAP
    ds = CocoDetection(prepared / "train.json", max_size=64)
    cfg = {**smoke_params["train_base"], "iters": 8, "checkpoint_every": 2, "warmup_iters": 0, "schedule": "cosine"}
    cpu = torch.device("cpu")

    def run(path, answer, stop_after=None):
        asked, log = [], _Rows()

        def step(it, images, targets, forward):
            loss = forward(torch.ones(1, 3)).pow(2).mean()
            loss.backward()
            return {"loss_fit": loss.detach()}

        def replan(it, seconds, cpu_seconds):
            asked.append(it)
            assert seconds >= 0 and cpu_seconds >= 0
            return answer(it)
        torch.manual_seed(0)
        out = train_loop(torch.nn.Linear(3, 1), ds, cfg, path, 1, cpu, step, fingerprint="x", log=log,
                         stop_after=stop_after, replan=replan)
        return out, asked, log

    out, asked, log = run(tmp_path / "a.pt", lambda it: 12)  # longer: asked at every checkpoint before 12
    assert out["iters"] == 12 and asked == [2, 4, 6, 8, 10]
    assert log.rows[11]["lr"] == pytest.approx(cfg["lr"] * lr_factor(11, {**cfg, "iters": 12}))
    out, asked, _ = run(tmp_path / "b.pt", lambda it: 3)  # shorter: stops at 3
    assert out["iters"] == 3 and asked == [2]
    out, asked, _ = run(tmp_path / "e.pt", lambda it: 12 if it < 8 else 9)  # past 12 / 2: shorter is followed
    assert out["iters"] == 9 and asked == [2, 4, 6, 8]
    out, asked, _ = run(tmp_path / "f.pt", lambda it: 12 if it < 8 else 20)  # past 12 / 2: longer is not
    assert out["iters"] == 12 and asked == [2, 4, 6, 8, 10]
    out, _, _ = run(tmp_path / "c.pt", lambda it: 10 ** 6)  # capped
    assert out["iters"] == REPLAN_CAP * cfg["iters"]
    run(tmp_path / "d.pt", lambda it: 12, stop_after=5)  # killed after 5 (replanned to 12 at 2 and 4)
    assert torch.load(tmp_path / "d.pt", weights_only=True)["iters"] == 12
    out, asked, log = run(tmp_path / "d.pt", lambda it: 12)
    assert out["iters"] == 12 and asked == [6, 8, 10] and sorted(log.rows) == list(range(5, 12))


def test_an_unreadable_training_state_is_ignored_not_fatal(prepared, smoke_params, tmp_path, capsys):
    torch.set_num_threads(1)
    ds = CocoDetection(prepared / "train.json", max_size=64)
    (tmp_path / "s.pt").write_bytes(b"PK\x03\x04 cut off by a crash")
    out = train_detector(_model(smoke_params, ds.labels.num_classes), ds, {**smoke_params["train_base"], "iters": 1},
                         tmp_path / "s.pt", seed=1, device=torch.device("cpu"), fingerprint="x")
    assert out["iters"] == 1 and "unreadable" in capsys.readouterr().err
    assert torch.load(tmp_path / "s.pt", weights_only=True)["iter"] == 1  # replaced by a good state
    assert (tmp_path / "s.pt.corrupt").read_bytes().startswith(b"PK")  # the bad one, set aside


def test_scale_jitter_draws_a_size_per_iteration_for_every_model_and_restores_it(smoke_params):
    student, teacher = _model(smoke_params, 3), _model(smoke_params, 3)
    size = smoke_params["model"]["min_size"]
    drawn = []
    for it in range(16):
        with jittered_input([student, teacher], [0.5, 1.0], 0, it) as r:
            assert student.transform.min_size == teacher.transform.min_size == (snap_size(size * r),)
            assert student.transform.max_size == snap_size(smoke_params["model"]["max_size"] * r)
            drawn.append(r)
    assert set(drawn) == {0.5, 1.0}
    assert student.transform.min_size == teacher.transform.min_size == (size,)  # restored
    again = []
    for it in range(16):  # the draw depends on (seed, iteration) only: a resumed run sees the same sizes
        with jittered_input([student], [0.5, 1.0], 0, it) as r:
            again.append(r)
    assert again == drawn


def test_train_base_writes_loadable_checkpoint_and_metrics(prepared, smoke_params, tmp_path):
    torch.set_num_threads(1)
    p = with_overrides(smoke_params, {"train_base": {"iters": 2}})
    metrics = train_base(p, prepared, tmp_path / "base")
    on_disk = json.loads((tmp_path / "base" / "metrics.json").read_text())
    assert on_disk == metrics
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl", "params", "flops", "arch"} <= set(metrics)
    assert not (tmp_path / "base" / "train_state.pt").exists()
    ckpt = read_checkpoint(tmp_path / "base" / "model.pt")  # weights_only=True inside
    assert ckpt["arch"] and ckpt["head"]["num_classes"] == 5
    model = load_detector(tmp_path / "base" / "model.pt")
    assert str(model.arch) == metrics["arch"]
    again = evaluate(model, prepared / "val.json", 8, torch.device("cpu"))
    assert again["AP"] == metrics["AP"]


def test_a_base_checkpoint_is_adopted_not_trained(base_ckpt, prepared, tmp_path):
    """model.base: PATH (or model.checkpoint) starts the run from that detector: params take its arch
    and head, train_base copies it (no training) and scores it; a wrong class count is one line."""
    from jdnas.config import load_params
    from jdnas.errors import ConfigError, JdnasError
    from conftest import REPO
    ckpt = read_checkpoint(base_ckpt)
    (tmp_path / "start.yaml").write_text(f"model:\n  base: {base_ckpt}\n  fpn_channels: 999\n  min_size: auto\n")
    p = load_params([REPO / "params.yaml", REPO / "config" / "smoke.yaml", tmp_path / "start.yaml"])
    assert p["model"]["checkpoint"] == str(base_ckpt) and p["model"]["base"] == str(Arch.from_json(ckpt["arch"]))
    assert all(p["model"][k] == ckpt["head"][k] for k in HEAD_KEYS)  # the checkpoint's head wins
    metrics = train_base(p, prepared, tmp_path / "base")
    assert metrics["train_iters"] == 0 and metrics["train_cpu_seconds"] == 0.0
    assert metrics["checkpoint"] == str(base_ckpt)
    for a, b in zip(load_detector(base_ckpt).state_dict().values(),
                    load_detector(tmp_path / "base" / "model.pt").state_dict().values()):
        assert torch.equal(a, b)
    assert metrics["AP"] == evaluate(load_detector(base_ckpt), prepared / "val.json", 8, torch.device("cpu"))["AP"]
    (tmp_path / "junk.pt").write_bytes(b"junk")
    (tmp_path / "junk.yaml").write_text(f"model:\n  checkpoint: {tmp_path / 'junk.pt'}\n")
    with pytest.raises(ConfigError, match="model.checkpoint: .*junk.pt: not a readable checkpoint"):
        load_params([REPO / "params.yaml", tmp_path / "junk.yaml"])
    other = build_detector(Arch.from_json(ckpt["arch"]), {**ckpt["head"], "num_classes": 3})
    save_detector(tmp_path / "other.pt", other)
    with pytest.raises(JdnasError, match="other.pt: model.checkpoint predicts 2 classes but .* has 4"):
        train_base({**p, "model": {**p["model"], "checkpoint": str(tmp_path / "other.pt")}}, prepared, tmp_path / "o")


def test_checkpoint_round_trip_preserves_outputs(smoke_params, tmp_path):
    model = _model(smoke_params, 3).eval()
    save_detector(tmp_path / "m.pt", model, note="x")
    loaded = load_detector(tmp_path / "m.pt")
    x = [torch.rand(3, 64, 64)]
    with torch.no_grad():
        fa, fb = model.backbone(x[0][None]), loaded.backbone(x[0][None])
    for k in fa:
        assert torch.equal(fa[k], fb[k])
    assert read_checkpoint(tmp_path / "m.pt")["meta"] == {"note": "x"}


def test_bad_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(JdnasError, match="checkpoint not found"):
        load_detector(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(JdnasError, match="not a readable checkpoint"):
        load_detector(tmp_path / "junk.pt")
    torch.save({"format": "other"}, tmp_path / "other.pt")
    with pytest.raises(JdnasError, match="format: not a jdnas-detector/1 checkpoint"):
        load_detector(tmp_path / "other.pt")


@pytest.mark.parametrize("change, words", [
    (lambda c: c.pop("arch"), "arch: missing from the checkpoint"),
    (lambda c: c.update(arch="{not json"), "arch: not a valid Arch"),
    (lambda c: c["head"].pop("fpn_channels"), "head: missing key 'fpn_channels'"),
    (lambda c: c["head"].update(fpn_channels=32), "state_dict: does not match its arch and head (size mismatch"),
    (lambda c: c["state_dict"].pop("roi_heads.box_head.fc6.weight"), "missing 'roi_heads.box_head.fc6.weight'"),
])
def test_an_altered_checkpoint_is_a_one_line_error(smoke_params, tmp_path, change, words):
    save_detector(tmp_path / "m.pt", _model(smoke_params, 3))
    ckpt = torch.load(tmp_path / "m.pt", weights_only=True)
    change(ckpt)
    torch.save(ckpt, tmp_path / "m.pt")
    with pytest.raises(JdnasError) as e:
        load_detector(tmp_path / "m.pt")
    assert words in str(e.value) and str(tmp_path / "m.pt") in str(e.value) and "\n" not in str(e.value)


def test_train_base_scores_minival_as_it_trains_and_keeps_the_best(prepared, smoke_params, tmp_path, capsys):
    from jdnas.baselines.base import BestCheckpoint
    torch.set_num_threads(1)
    p = with_overrides(smoke_params, {"train_base": {"iters": 4, "eval_every": 2}})
    metrics = train_base(p, prepared, tmp_path / "base")
    err = capsys.readouterr().err
    assert "train_base: iteration 2: minival AP" in err and "train_base: keeping iteration" in err
    assert metrics["kept_iter"] in (2, 4) and not (tmp_path / "base" / "best.pt").exists()
    # the best weights survive a restart and are replaced only by better ones
    model = _model(smoke_params, 5)
    best = BestCheckpoint(tmp_path, "fp")
    assert best.offer(2, 10.0, model) and not best.offer(4, 9.0, model) and best.offer(6, 11.0, model)
    again = BestCheckpoint(tmp_path, "fp")
    assert (again.it, again.ap) == (6, 11.0) and again.state_dict().keys() == model.state_dict().keys()
    assert BestCheckpoint(tmp_path, "other run").it is None


def test_iterations_may_be_given_in_epochs(prepared, smoke_params):
    from jdnas.data.prepare import resolved_params
    p = with_overrides(smoke_params, {"train_base": {"iters": "2 epochs", "batch_size": 4},
                                      "teacher_pool": {"train": {"iters": "0.5 epochs"}}})
    images = json.loads((prepared / "manifest.json").read_text())["splits"]["train"]["images"]
    r = resolved_params(p, prepared)
    assert r["train_base"]["iters"] == math.ceil(2 * images / 4)
    assert r["teacher_pool"]["train"]["iters"] == math.ceil(0.5 * images / p["teacher_pool"]["train"]["batch_size"])
    assert r["train_student"] == p["train_student"]
