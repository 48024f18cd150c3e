"""Inputs are sacred, and faults (issue 26, classes "data loss" and "faults"): an output over an
input is refused before any work with one line naming both, and the inputs are byte-identical
afterwards; OS errors, Ctrl-C and kill -9 give one line (or a clean rerun), never a traceback."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from jdnas.cli import main
from jdnas.errors import JdnasError
from jdnas.io import OUTPUT_MARKER, atomic_dir, atomic_path, clean_stale_tmp, resume_dir
from conftest import REPO, cli_env, write_yaml

PARAMS = str(REPO / "params.yaml")


def snapshot(*roots: Path) -> dict:
    """Every file's bytes (and every folder) under `roots`: equal before and after = untouched."""
    out = {}
    for root in roots:
        root = Path(root)
        if root.is_file():
            out[str(root)] = root.read_bytes()
            continue
        for dirpath, dirs, files in os.walk(root):
            out[dirpath] = sorted(dirs + files)
            for f in files:
                out[os.path.join(dirpath, f)] = Path(dirpath, f).read_bytes()
    return out


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jdnas: error: ") and "Traceback" not in err[0], err
    return err[0]


def coco_user(tmp: Path) -> dict:
    """A small user COCO dataset: train/ and val/ image folders and their annotation files."""
    user = tmp / "user"
    for split, n in (("train", 6), ("val", 2)):
        (user / split).mkdir(parents=True)
        images, anns = [], []
        for i in range(1, n + 1):
            Image.new("RGB", (40, 30), (i * 30, 0, 0)).save(user / split / f"{i}.png")
            images.append({"id": i, "file_name": f"{i}.png", "width": 40, "height": 30})
            anns.append({"id": 100 + i, "image_id": i, "category_id": 1, "bbox": [2, 2, 12, 10], "iscrowd": 0})
        (user / f"{split}.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                        "categories": [{"id": 1, "name": "thing"}]}))
    c = {"train_images": str(user / "train"), "train_annotations": str(user / "train.json"),
         "val_images": str(user / "val"), "val_annotations": str(user / "val.json")}
    params = write_yaml(tmp / "coco.yaml", {"data": {"source": "coco", "coco": c}})
    return {"user": user, "params": params, **c}


# --- data loss: prepare-data ----------------------------------------------------------------------
PREPARE_OUTS = {  # --out relative to the user's data: (path, words)
    "the train image folder": (lambda u: u["train_images"], "is the input data.coco.train_images"),
    "the val image folder": (lambda u: u["val_images"], "is the input data.coco.val_images"),
    "a folder inside the images": (lambda u: Path(u["train_images"]) / "prepared", "lies inside the input"),
    "the folder holding the data": (lambda u: u["user"], "contains the input"),
    "the annotation file": (lambda u: u["train_annotations"], "is the input data.coco.train_annotations"),
    "a link to the image folder": (lambda u: _link(Path(u["user"]).parent / "link", u["train_images"]),
                                   "is the input data.coco.train_images"),
    "the params file": (lambda u: u["params"], "is the input --params"),
}


def _link(link: Path, target) -> Path:
    link.symlink_to(target)
    return link


@pytest.mark.parametrize("name", sorted(PREPARE_OUTS))
def test_prepare_data_never_writes_over_the_users_data(tmp_path, capsys, name):
    u = coco_user(tmp_path)
    out = PREPARE_OUTS[name][0](u)
    before = snapshot(u["user"], u["params"])
    assert main(["prepare-data", "--out", str(out), "--params", PARAMS, "--params", str(u["params"])]) == 2
    line = one_line(capsys)
    assert PREPARE_OUTS[name][1] in line and "refusing to write there" in line, line
    assert snapshot(u["user"], u["params"]) == before


def test_prepare_data_never_replaces_a_folder_it_did_not_make(tmp_path, capsys):
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"\xff\xd8 precious")
    before = snapshot(mine)
    smoke = str(REPO / "config" / "smoke.yaml")
    assert main(["prepare-data", "--out", str(mine), "--params", PARAMS, "--params", smoke]) == 2
    assert f"{mine}: exists and was not made by prepare-data" in one_line(capsys)
    assert snapshot(mine) == before
    (tmp_path / "afile").write_text("keep")
    assert main(["prepare-data", "--out", str(tmp_path / "afile"), "--params", PARAMS, "--params", smoke]) == 2
    assert "exists and is not a folder jdnas made" in one_line(capsys)
    assert (tmp_path / "afile").read_text() == "keep"


def test_prepare_data_replaces_its_own_output_and_legacy_output(tmp_path, capsys):
    smoke = str(REPO / "config" / "smoke.yaml")
    out = tmp_path / "prepared"
    assert main(["prepare-data", "--out", str(out), "--params", PARAMS, "--params", smoke]) == 0
    assert (out / OUTPUT_MARKER).is_file()
    first = snapshot(out)
    assert main(["prepare-data", "--out", str(out), "--params", PARAMS, "--params", smoke]) == 0
    assert snapshot(out) == first  # same params: the same folder again
    (out / OUTPUT_MARKER).unlink()  # a folder an earlier jdnas wrote, before markers
    assert main(["prepare-data", "--out", str(out), "--params", PARAMS, "--params", smoke]) == 0
    assert (out / OUTPUT_MARKER).is_file()
    assert not list(tmp_path.glob(".prepared.*"))


# --- data loss: checkpoints, tables, folders of other commands ----------------------------------
@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    from jdnas.config import load_params
    from jdnas.models.arch import resolve_arch
    from jdnas.models.detector import build_detector, head_config, save_detector
    params = load_params([REPO / "params.yaml", REPO / "config" / "smoke.yaml"])
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_detector(path, build_detector(resolve_arch("tiny", 0.5), head_config(params["model"], 3)).eval())
    return path


def _copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(src.read_bytes())
    return dst


def _folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "keep.json").write_text('{"precious": true}')
    return path


# name: (build the inputs in tmp (given the tiny checkpoint) -> (argv, paths to keep), words)
CASES = {
    "export X.pt --out X.pt": (lambda t, c: (["export", str(_copy(c, t / "X.pt")), "--out", str(t / "X.pt")],
                                             [t / "X.pt"]), "--out {t}/X.pt is the input CKPT"),
    "export --out a hard link to X.pt": (
        lambda t, c: (["export", str(_copy(c, t / "X.pt")), "--out", str(_hard(t / "X.pt", t / "Y.onnx"))],
                      [t / "X.pt"]), "is the input CKPT"),
    "export --out a symlink to X.pt": (
        lambda t, c: (["export", str(_copy(c, t / "X.pt")), "--out", str(_link(t / "Y.onnx", t / "X.pt"))],
                      [t / "X.pt"]), "is the input CKPT"),
    "import A.pth --out A.pth": (lambda t, c: (["import-torchvision", str(_copy(c, t / "A.pth")), "--out",
                                                str(t / "A.pth"), "--params", PARAMS], [t / "A.pth"]),
                                 "is the input SRC"),
    "import --out a symlink to A.pth": (
        lambda t, c: (["import-torchvision", str(_copy(c, t / "A.pth")), "--out", str(_link(t / "B.pt", t / "A.pth")),
                       "--params", PARAMS], [t / "A.pth"]), "is the input SRC"),
    "train-base --out the prepared data": (
        lambda t, c: (["train-base", "--data", str(_folder(t / "data")), "--out", str(t / "data"), "--params", PARAMS],
                      [t / "data"]), "is the input --data"),
    "train-base --out inside the prepared data": (
        lambda t, c: (["train-base", "--data", str(_folder(t / "data")), "--out", str(t / "data" / "base"),
                       "--params", PARAMS], [t / "data"]), "lies inside the input --data"),
    "train --out the folder of --init": (
        lambda t, c: (["train", "--init", str(_copy(c, t / "runs" / "model.pt")), "--out", str(t / "runs"),
                       "--data", str(_folder(t / "d")), "--params", PARAMS], [t / "runs"]), "contains the input --init"),
    "train --out the teacher": (
        lambda t, c: (["train", "--init", str(_copy(c, t / "i.pt")), "--teacher", str(_copy(c, t / "tt.pt")),
                       "--out", str(t / "tt.pt"), "--data", str(_folder(t / "d")), "--params", PARAMS],
                      [t / "i.pt", t / "tt.pt"]), "is the input --teacher"),
    "train-teacher-pool --out the base's folder": (
        lambda t, c: (["train-teacher-pool", "--base", str(_copy(c, t / "base" / "model.pt")), "--out", str(t / "base"),
                       "--data", str(_folder(t / "d")), "--params", PARAMS], [t / "base"]), "contains the input --base"),
    "eval-teacher-pool --out the supernet": (
        lambda t, c: (["eval-teacher-pool", "--supernet", str(_copy(c, t / "s.pt")), "--out", str(t / "s.pt"),
                       "--data", str(_folder(t / "d")), "--params", PARAMS], [t / "s.pt"]), "is the input --supernet"),
    "search --root the data": (
        lambda t, c: (["search", "--root", str(_folder(t / "d")), "--data", str(t / "d"), "--params", PARAMS],
                      [t / "d"]), "--root"),
    "search-step --root holding the latency table": (
        lambda t, c: (["search-step", "init", "--root", str(t / "r"), "--latency-table",
                       str(_copy(c, t / "r" / "table.csv")), "--data", str(_folder(t / "d")), "--params", PARAMS],
                      [t / "r"]), "contains the input --latency-table"),
    "evaluate-final --out the state's folder": (
        lambda t, c: (["evaluate-final", "--state", str(_copy(c, t / "f" / "state.json")), "--out", str(t / "f"),
                       "--data", str(_folder(t / "d")), "--params", PARAMS], [t / "f"]), "contains the input --state"),
    "baseline --out the data": (
        lambda t, c: (["baseline", "--out", str(_folder(t / "d")), "--data", str(t / "d"), "--params", PARAMS],
                      [t / "d"]), "is the input --data"),
    "report --out the runs": (
        lambda t, c: (["report", "--runs", str(_folder(t / "runs")), "--out", str(t / "runs"),
                       "--data", str(_folder(t / "d")), "--params", PARAMS], [t / "runs"]), "is the input --runs"),
    "profile-latency --out the data": (
        lambda t, c: (["profile-latency", "--out", str(_folder(t / "d")), "--data", str(t / "d"), "--params", PARAMS],
                      [t / "d"]), "is the input --data"),
    "train-base --out the model.checkpoint's folder": (
        lambda t, c: (["train-base", "--out", str(t / "ck"), "--data", str(_folder(t / "d")), "--params", PARAMS,
                       "--params", str(write_yaml(t / "ck.yaml", {"model": {
                           "checkpoint": str(_copy(c, t / "ck" / "model.pt"))}}))], [t / "ck"]),
        "contains the input model.checkpoint"),
}


def _hard(src: Path, link: Path) -> Path:
    os.link(src, link)
    return link


@pytest.mark.parametrize("name", sorted(CASES))
def test_outputs_over_inputs_are_refused_and_inputs_kept(tmp_path, tiny_ckpt, capsys, name):
    make, words = CASES[name]
    argv, keep = make(tmp_path, tiny_ckpt)
    before = snapshot(*keep)
    assert main(argv) == 2
    line = one_line(capsys)
    assert words.format(t=tmp_path) in line and "refusing to write there" in line, line
    assert snapshot(*keep) == before


def test_running_in_the_users_folder_with_out_dot_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    before = snapshot(tmp_path)
    assert main(["prepare-data", "--out", "."]) == 2
    assert "--out . contains the input --params params.yaml" in one_line(capsys)
    assert snapshot(tmp_path) == before


def test_resume_dir_never_empties_a_folder_no_stage_wrote(tmp_path):
    _folder(tmp_path / "user")
    before = snapshot(tmp_path / "user")
    with pytest.raises(JdnasError, match="holds files no jdnas stage wrote"):
        resume_dir(tmp_path / "user", "abc")
    assert snapshot(tmp_path / "user") == before
    assert resume_dir(tmp_path / "mine", "abc") is False and resume_dir(tmp_path / "mine", "abc") is True
    (tmp_path / "mine" / "x").write_text("stale")
    assert resume_dir(tmp_path / "mine", "other") is False and not (tmp_path / "mine" / "x").exists()


# --- faults -------------------------------------------------------------------------------------------
def _raise(err):
    def fn(*a, **k):
        raise err
    return fn


OS_FAULTS = {  # (errno, what is patched to fail, words)
    "read-only output": (errno.EROFS, "on a read-only file system (choose an output on a writable disk)"),
    "permission denied": (errno.EACCES, "permission denied"),
    "full disk (prepare-data)": (errno.ENOSPC, "the disk is full writing {out} (free some space and rerun the command)"),
    "quota exceeded": (errno.EDQUOT, "the disk is full"),
    "too many links": (errno.EMLINK, "too many links"),
    "name too long": (errno.ENAMETOOLONG, "file name too long"),
    "other errno": (errno.EIO, "Input/output error"),
}


@pytest.mark.parametrize("name", sorted(OS_FAULTS))
def test_os_errors_writing_the_output_are_one_line(tmp_path, capsys, monkeypatch, name):
    import tempfile
    code, words = OS_FAULTS[name]
    out = tmp_path / "prepared"
    monkeypatch.setattr(tempfile, "mkdtemp", _raise(OSError(code, os.strerror(code), str(out))))
    assert main(["prepare-data", "--out", str(out), "--params", PARAMS,
                 "--params", str(REPO / "config" / "smoke.yaml")]) == 2
    line = one_line(capsys)
    assert words.format(out=out) in line and str(out) in line, line
    assert not out.exists()


def test_full_disk_while_training_says_training_resumes(monkeypatch, capsys):
    import jdnas.cli as cli
    full = _raise(OSError(errno.ENOSPC, "No space left", "runs/base/last.pt"))
    parser_args = ["train-base", "--params", PARAMS]
    monkeypatch.setattr(cli, "build_parser", _with_fn(cli.build_parser, "train-base", full))
    assert main(parser_args) == 2
    assert "the disk is full writing runs/base/last.pt (free some space and rerun: training resumes" in one_line(capsys)


def _with_fn(build, name, fn):
    def b():
        parser = build()
        action = next(a for a in parser._actions if a.dest == "command")
        action.choices[name].set_defaults(fn=fn)
        return parser
    return b


PATH_FAULTS = {  # --out or an input that the file system refuses: (make argv in tmp, words)
    "--out under a file (prepare-data)": (
        lambda t: (t / "f").write_text("x") and ["prepare-data", "--out", str(t / "f" / "sub")], "is a file, not a folder"),
    "export --out an existing folder": (lambda t: (t / "o").mkdir() or ["export", "m.pt", "--out", str(t / "o")],
                                        "is a folder: give the .onnx file to write"),
    "import --out an existing folder": (lambda t: (t / "o").mkdir() or ["import-torchvision", "a.pth", "--out",
                                                                        str(t / "o")], "is a folder: give the jdnas"),
    "export --out under a file": (lambda t: (t / "f").write_text("x") and ["export", "m.pt", "--out", str(t / "f" / "m")],
                                  "is a file, not a folder"),
    "--out a link loop (prepare-data)": (lambda t: os.symlink(t / "loop", t / "loop") or [
        "prepare-data", "--out", str(t / "loop")], "exists and is not a folder jdnas made (a link)"),
    "export a missing checkpoint": (lambda t: ["export", str(t / "none.pt"), "--out", str(t / "m.onnx")],
                                    "none.pt: checkpoint not found"),
}


@pytest.mark.parametrize("name", sorted(PATH_FAULTS))
def test_bad_paths_are_one_line(tmp_path, capsys, name):
    argv = PATH_FAULTS[name][0](tmp_path)
    if argv[0] in ("prepare-data", "import-torchvision"):
        argv += ["--params", PARAMS, "--params", str(REPO / "config" / "smoke.yaml")]
    assert main(argv) == 2
    assert PATH_FAULTS[name][1] in one_line(capsys)


def _fifo(p: Path) -> Path:
    os.mkfifo(p)
    return p


ANNOTATION_FAULTS = {  # what the annotation file is: (make, words)
    "a folder": (lambda p: p.mkdir() or p, "is a folder, not a file"),
    "a FIFO": (_fifo, "not a regular file (a FIFO, socket or device)"),
    "/dev/zero": (lambda p: Path("/dev/zero"), "not a regular file"),
    "a link loop": (lambda p: os.symlink(p, p) or p, "too many levels of symbolic links"),
    "a broken link": (lambda p: os.symlink(p.parent / "gone", p) or p, "file not found (a broken link)"),
    "not UTF-8": (lambda p: (p.write_bytes(b"\xff\xfe{}"), p)[1], "not UTF-8 text"),
    "JSON nested deep": (lambda p: (p.write_text("[" * 100000 + "]" * 100000), p)[1], "nested too deep"),
}


@pytest.mark.parametrize("name", sorted(ANNOTATION_FAULTS))
def test_annotation_files_that_are_not_files_are_one_line(tmp_path, capsys, name):
    u = coco_user(tmp_path)
    make, words = ANNOTATION_FAULTS[name]
    ann = tmp_path / "ann.json"
    ann = make(ann)
    write_yaml(u["params"], {"data": {"source": "coco", "coco": {
        "train_images": u["train_images"], "train_annotations": str(ann),
        "val_images": u["val_images"], "val_annotations": u["val_annotations"]}}})
    assert main(["inspect-data", "--params", PARAMS, "--params", str(u["params"])]) == 2
    line = one_line(capsys)
    assert str(ann) in line and words in line, line


def test_ctrl_c_is_one_line_exit_130(monkeypatch, capsys):
    import jdnas.cli as cli
    monkeypatch.setattr(cli, "build_parser", _with_fn(cli.build_parser, "arch", _raise(KeyboardInterrupt())))
    assert main(["arch", "tiny", "--params", PARAMS]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jdnas: interrupted (Ctrl-C): arch stopped"), err
    assert err[0].endswith("(rerun it: it starts afresh)"), err  # arch trains nothing


def _spawn_prepare(out: Path, params: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jdnas.cli", "prepare-data", "--out", str(out), "--params", PARAMS,
                             "--params", str(params)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env(), cwd=REPO)


def _wait_for_tmp(proc: subprocess.Popen, parent: Path, timeout: float = 120) -> bool:
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        tmps = list(parent.glob(".prepared.*.tmp"))
        if tmps and any((t / "images").exists() for t in tmps):
            return True
        time.sleep(0.02)
    return False


@pytest.fixture(scope="module")
def slow_params(tmp_path_factory) -> Path:
    """Synthetic data large enough that a signal lands mid-stage (a few seconds on a loaded machine)."""
    t = tmp_path_factory.mktemp("slow")
    return write_yaml(t / "slow.yaml", {"data": {"synthetic": {"train_images": 200, "val_images": 20,
                                                               "image_size": 96, "max_size": 40}},
                                        "model": {"base": "tiny", "width": 0.5},
                                        "search_space": {"max_depth": [1, 2, 1, 1]}})


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill -9", "Ctrl-C"])
def test_an_interrupted_prepare_data_reruns_to_the_uninterrupted_result(tmp_path, slow_params, sig):
    out = tmp_path / "prepared"
    proc = _spawn_prepare(out, slow_params)
    caught = _wait_for_tmp(proc, tmp_path)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    caught = caught and proc.returncode != 0  # on a quiet machine the stage may finish before the signal lands
    if caught:
        assert not out.exists()  # nothing that looks finished
        if sig == signal.SIGINT:
            assert proc.returncode == 130 and "Traceback" not in err, err
            assert err.strip().splitlines()[-1].startswith("jdnas: interrupted (Ctrl-C)")
            assert not list(tmp_path.glob(".prepared.*.tmp"))  # its own temporaries removed on the way out
        else:
            assert list(tmp_path.glob(".prepared.*.tmp"))  # kill -9: left behind ...
    rerun = _spawn_prepare(out, slow_params)
    assert rerun.wait(timeout=300) == 0, rerun.communicate()[1]
    assert not list(tmp_path.glob(".prepared.*.tmp"))  # ... and removed by the rerun
    ref = tmp_path / "ref" / "prepared"
    ref.parent.mkdir()
    assert _spawn_prepare(ref, slow_params).wait(timeout=300) == 0
    a, b = snapshot(out), snapshot(ref)
    assert sorted(os.path.relpath(k, out) for k in a) == sorted(os.path.relpath(k, ref) for k in b)
    for k, v in a.items():
        if isinstance(v, bytes):
            assert v == b[str(ref / os.path.relpath(k, out))], k


def test_two_concurrent_runs_into_one_output(tmp_path, slow_params):
    out = tmp_path / "prepared"
    procs = [_spawn_prepare(out, slow_params) for _ in range(2)]
    codes = [p.wait(timeout=300) for p in procs]
    errs = [p.communicate()[1] for p in procs]
    assert 0 in codes and all(c in (0, 2) for c in codes), errs
    assert all("Traceback" not in e for e in errs), errs
    from jdnas.data.prepare import check_prepared
    check_prepared(out)
    assert not list(tmp_path.glob(".prepared.*.tmp"))


# --- no litter ---------------------------------------------------------------------------------------
def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_stale_temporaries_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    dead, live = _dead_pid(), os.getppid()
    (tmp_path / f".prepared.{dead}.abc.tmp" / "images").mkdir(parents=True)
    (tmp_path / f".prepared.{live}.abc.tmp").mkdir()
    old = tmp_path / ".prepared.k3j2h1.tmp"  # named by an earlier jdnas (no pid), hours old
    old.mkdir()
    os.utime(old, (time.time() - 7 * 3600,) * 2)
    young = tmp_path / ".prepared.zz9.tmp"
    young.mkdir()
    (tmp_path / f".model.pt.{dead}.q.tmp").write_bytes(b"half")
    (tmp_path / f".other.{dead}.q.tmp").write_bytes(b"not ours")
    with atomic_dir(tmp_path / "prepared") as d:
        (d / "x").write_text("1")
    with atomic_path(tmp_path / "model.pt") as p:
        p.write_bytes(b"ok")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([f".prepared.{live}.abc.tmp", ".prepared.zz9.tmp", f".other.{dead}.q.tmp",
                           "prepared", "model.pt"]), left
    assert clean_stale_tmp(tmp_path / "other") == [tmp_path / f".other.{dead}.q.tmp"]
