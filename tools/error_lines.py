#!/usr/bin/env python
"""The line `jdnas` prints for every bad input of the test suite's corpora, as a Markdown document.

    .venv/bin/python tools/error_lines.py > docs/error_lines.md

Each case is built the way its test builds it: the case tables and helpers are imported from
tests/test_inputs_params.py, test_inputs_artifacts.py, test_inputs_outputs.py and test_latency.py,
and a pytest fixture a case needs (a prepared tiny dataset, a checkpoint...) is built once by that
fixture's own function. Every case runs the real `jdnas.cli.main([...])` in-process, stdout and
stderr captured (a subprocess only where the test starts one: kill -9, Ctrl-C, concurrent runs).
A refusal must be one line on stderr, exit 2 (130 for Ctrl-C), no traceback; a case the tests
expect to be handled must exit 0. Cases that break either, or whose line lacks the words the test
checks for, are listed at the end of the document. Progress goes to stderr.

Options: --only CLASS (params, artifacts, outputs, faults, latency; repeatable) and
--no-subprocess (skip the kill -9 / Ctrl-C / concurrent-run cases), for a quicker look.
"""
from __future__ import annotations

import os
import re

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: one core here and in the subprocesses
os.environ["DVC_NO_ANALYTICS"] = "1"

import argparse  # noqa: E402
import copy  # noqa: E402
import errno  # noqa: E402
import io  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from contextlib import redirect_stderr, redirect_stdout  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import pytest  # noqa: E402
import torch  # noqa: E402

import conftest as C  # noqa: E402
import test_inputs_artifacts as A  # noqa: E402
import test_inputs_outputs as O  # noqa: E402
import test_inputs_params as P  # noqa: E402
import test_latency as L  # noqa: E402
import jdnas.cli as cli  # noqa: E402

torch.set_num_threads(1)

PARAMS = str(REPO / "params.yaml")
SMOKE = str(REPO / "config" / "smoke.yaml")
LINE_CHARS = 200
PROGRESS = re.compile(r"\d+%\|.*\| *\d+/\d+ ")  # a tqdm progress bar on stderr (a handled case's, not an error)
CASE_LIMIT_S = 120  # an in-process case that takes longer is stopped and reported

CLASSES = {  # key: section title
    "params": "Params files",
    "artifacts": "Artifacts (checkpoints, supernets, torchvision state_dicts)",
    "outputs": "Outputs over inputs (data loss)",
    "faults": "Faults (OS errors, bad paths, Ctrl-C, kill -9, concurrent runs)",
    "latency": "Latency tables",
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- fixtures: each built once, by the fixture's own function --------------------------------------
class TmpFactory:
    """What pytest's tmp_path_factory gives a fixture: fresh folders."""

    def __init__(self, root: Path):
        self.root, self.n = root, 0

    def mktemp(self, basename: str, numbered: bool = True) -> Path:
        self.n += 1
        path = self.root / f"{basename}{self.n}"
        path.mkdir(parents=True)
        return path


class Fixtures:
    def __init__(self, root: Path):
        self.root = root
        self.factory = TmpFactory(root)
        self.cache: dict[str, object] = {}

    def __getitem__(self, name: str):
        if name not in self.cache:
            start = time.perf_counter()
            self.cache[name] = getattr(self, "_" + name)()
            log(f"  fixture {name}: built in {time.perf_counter() - start:.1f} s")
        return self.cache[name]

    # the tests' fixtures (pytest keeps the undecorated function as __wrapped__)
    def _smoke_params(self):
        return C.smoke_params.__wrapped__()

    def _prepared(self):
        return C.prepared.__wrapped__(self.factory, self["smoke_params"])

    def _good(self):
        return A.good.__wrapped__()

    def _supernet_dict(self):
        return A.supernet_dict.__wrapped__(self["good"])

    def _tv_sd(self):
        return A.tv_sd.__wrapped__()

    def _tiny_ckpt(self):
        return O.tiny_ckpt.__wrapped__(self.factory)

    def _slow_params(self):
        return O.slow_params.__wrapped__(self.factory)

    def _default_params(self):
        return L.default_params.__wrapped__()

    # what several cases of one test build alike
    def _table_lines(self):
        """test_latency's saved synthetic table, as lines (every damaged-table case starts from it)."""
        path = self.factory.mktemp("table") / "t.csv"
        L.synthetic_table(self["default_params"]).save(path)
        return path.read_text().splitlines()

    def _table(self):
        path = self.factory.mktemp("table") / "t.csv"
        path.write_text("\n".join(self["table_lines"]) + "\n")
        return path

    def _slow_reference(self):
        """An uninterrupted prepare-data of the slow params, as the kill -9 / Ctrl-C test makes it."""
        ref = self.factory.mktemp("ref") / "prepared"
        proc = O._spawn_prepare(ref, self["slow_params"])
        err = proc.communicate(timeout=300)[1]
        if proc.returncode != 0:
            raise RuntimeError(f"the reference prepare-data failed: {err}")
        return ref


# --- running a case ----------------------------------------------------------------------------------
class CaseTimeout(BaseException):
    pass


def _alarm(signum, frame):
    raise CaseTimeout()


def run_cli(argv: list[str], cwd: Path | None = None,
            patch: Callable[[pytest.MonkeyPatch], None] | None = None) -> tuple[object, str]:
    """`jdnas.cli.main(argv)` in-process: (exit code, stderr). Its stdout is kept out of the document."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        if cwd is not None:
            mp.chdir(cwd)
        if patch is not None:
            patch(mp)
        signal.alarm(CASE_LIMIT_S)
        try:
            with redirect_stdout(out), redirect_stderr(err):
                code = main_cli(argv)
        except SystemExit as e:  # argparse: a usage error
            code = e.code if isinstance(e.code, int) else 1
        except CaseTimeout:
            code = "timeout"
            err.write(f"(no answer within {CASE_LIMIT_S} s)\n")
        except Exception:  # noqa: BLE001 - an exception out of main is a finding, not a crash of this script
            code = "exception"
            err.write(traceback.format_exc())
        finally:
            signal.alarm(0)
    return code, err.getvalue()


def main_cli(argv: list[str]):
    return cli.main(argv)  # looked up at call time: a case may patch jdnas.cli


@dataclass
class Result:
    exit: str
    line: str                      # what the table shows
    problems: list[str] = field(default_factory=list)
    refused: bool = True           # a refusal (one line) rather than a case the tests expect handled


def refusal(code, err: str, words=(), expect: int = 2, changed: bool = False) -> Result:
    lines = err.strip().splitlines()
    problems = []
    if code != expect:
        problems.append(f"exit {code}, expected {expect}")
    if "Traceback" in err:
        problems.append("a traceback")
    if len(lines) != 1:
        problems.append(f"{len(lines)} lines on stderr")
    elif not lines[0].startswith("jdnas: "):
        problems.append("the line does not start with 'jdnas: '")
    for w in words:
        if w not in err:
            problems.append(f"the line lacks the test's words {w!r}")
    if changed:
        problems.append("an input changed")
    shown = lines[0] if len(lines) == 1 else f"[{len(lines)} lines] " + (lines[-1] if lines else "")
    return Result(str(code), shown, problems)


def handled(code, err: str, note: str, words=(), expect: int = 0) -> Result:
    problems = []
    if code != expect:
        problems.append(f"exit {code}, expected {expect}")
    if "Traceback" in err:
        problems.append("a traceback")
    for w in words:
        if w not in err:
            problems.append(f"stderr lacks the test's words {w!r}")
    lines = err.strip().splitlines()
    said = [x for x in lines if x.strip() and not PROGRESS.search(x)]
    shown = f"(handled: {note})" + (f" stderr: {said[-1]}" if said else "")
    if len(said) > 1:
        shown = f"(handled: {note}) [{len(said)} lines on stderr] last: {said[-1]}"
    if len(said) < len(lines):
        shown += " (and progress bars)"
    return Result(str(code), shown, problems, refused=False)


@dataclass
class Case:
    cls: str
    name: str
    run: Callable[[Path], Result] | None
    skip: str = ""                 # why it is not run


# --- params ------------------------------------------------------------------------------------------
def arch_argv(*params: Path | str) -> list[str]:
    """What the CLI params test runs: `jdnas arch tiny` with the params files."""
    return ["arch", "tiny", *[a for p in params for a in ("--params", str(p))]]


def params_cases(fx: Fixtures) -> list[Case]:
    cases = []
    for name, (override, words) in P.BAD.items():
        def run(t, override=override, words=words):
            bad = C.write_yaml(t / "bad.yaml", override)
            return refusal(*run_cli(arch_argv(PARAMS, bad)), [words])
        cases.append(Case("params", name, run))
    raw = {**P.RAW, "alias bomb as train_base.steps": (f"train_base:\n  steps: {P._alias_bomb()}\n".encode(),
                                                       "train_base.steps = [[[[")}
    for name, (content, words) in raw.items():
        def run(t, content=content, words=words):
            (t / "bad.yaml").write_bytes(content)
            return refusal(*run_cli(arch_argv(PARAMS, t / "bad.yaml")), ["jdnas: error: ", words])
        cases.append(Case("params", f"file: {name}", run))
    for name, files in P.GOOD.items():
        cases.append(Case("params", f"shipped: {name}",
                          lambda t, files=files: handled(*run_cli(arch_argv(*files)), "loads")))
    for name, override in P.EDGE_OK.items():
        def run(t, override=override):
            ok = C.write_yaml(t / "ok.yaml", override)
            return handled(*run_cli(arch_argv(PARAMS, ok)), "within the bounds")
        cases.append(Case("params", f"edge, accepted: {name}", run))
    return cases


# --- artifacts ---------------------------------------------------------------------------------------
def export_argv(ckpt: Path, t: Path) -> list[str]:
    return ["export", str(ckpt), "--out", str(t / "m.onnx")]


def artifact_cases(fx: Fixtures) -> list[Case]:
    cases = []
    for name, (mutate, words) in A.BAD.items():
        def run(t, mutate=mutate, words=words):
            ckpt = copy.deepcopy(fx["good"])
            mutate(ckpt)
            torch.save(ckpt, t / "model.pt")
            return refusal(*run_cli(export_argv(t / "model.pt", t)), [f"jdnas: error: {t / 'model.pt'}: ", words])
        cases.append(Case("artifacts", f"checkpoint: {name}", run))
    for name, (make, words) in A.FILES.items():
        def run(t, make=make, words=words):
            make(t / "model.pt")
            return refusal(*run_cli(export_argv(t / "model.pt", t)), [str(t / "model.pt"), words])
        cases.append(Case("artifacts", f"checkpoint file: {name}", run))
    for name, mutate in A.ACCEPTED.items():
        def run(t, mutate=mutate):
            ckpt = copy.deepcopy(fx["good"])
            mutate(ckpt)
            torch.save(ckpt, t / "model.pt")
            return handled(*run_cli(export_argv(t / "model.pt", t)), "loads and exports to ONNX")
        cases.append(Case("artifacts", f"checkpoint, accepted: {name}", run))
    for name, (mutate, words) in A.SUPERNET_BAD.items():
        def run(t, mutate=mutate, words=words):
            ckpt = copy.deepcopy(fx["supernet_dict"])
            mutate(ckpt)
            torch.save(ckpt, t / "supernet.pt")
            argv = ["eval-teacher-pool", "--supernet", str(t / "supernet.pt"), "--data", str(fx["prepared"]),
                    "--out", str(t / "pool.csv"), "--params", PARAMS, "--params", SMOKE]
            return refusal(*run_cli(argv), [str(t / "supernet.pt"), words])
        cases.append(Case("artifacts", f"supernet: {name}", run))
    cases.append(Case("artifacts", "supernet, accepted: a good supernet", None,
                      "the test only loads it; `jdnas eval-teacher-pool` would then evaluate the pool (too long)"))
    for name, (make, words) in A.TV_BAD.items():
        def run(t, make=make, words=words):
            torch.save(make(fx["tv_sd"]), t / "tv.pth")
            argv = ["import-torchvision", str(t / "tv.pth"), "--out", str(t / "jd.pt"), "--params", PARAMS]
            r = refusal(*run_cli(argv), [str(t / "tv.pth"), words])
            if (t / "jd.pt").exists():
                r.problems.append("--out was written")
            return r
        cases.append(Case("artifacts", f"torchvision state_dict: {name}", run))

    def without_params(t):
        torch.save(fx["tv_sd"], t / "tv.pth")
        code, err = run_cli(["import-torchvision", str(t / "tv.pth"), "--out", str(t / "jd.pt")], cwd=REPO)
        return handled(code, err, "torchvision's head settings kept", [
            "head settings from the params: none; torchvision's defaults: min_size, max_size"])

    def params_set(t):
        torch.save(fx["tv_sd"], t / "tv.pth")
        (t / "p.yaml").write_text("model:\n  min_size: 320\n  max_size: 512\n")
        return handled(*run_cli(["import-torchvision", str(t / "tv.pth"), "--out", str(t / "jd.pt"),
                                 "--params", PARAMS, "--params", str(t / "p.yaml")]), "the params' head settings used")

    def params_set_one(t):
        torch.save(fx["tv_sd"], t / "tv.pth")
        (t / "q.yaml").write_text("model:\n  min_size: 96\n")
        return handled(*run_cli(["import-torchvision", str(t / "tv.pth"), "--out", str(t / "jd2.pt"),
                                 "--params", str(t / "q.yaml")]), "min_size from the params, the rest torchvision's",
                       ["head settings from the params: min_size;"])
    cases += [Case("artifacts", "torchvision, accepted: no --params (run in the repo)", without_params),
              Case("artifacts", "torchvision, accepted: params set min_size, max_size", params_set),
              Case("artifacts", "torchvision, accepted: params set only min_size", params_set_one)]
    return cases


# --- outputs over inputs -----------------------------------------------------------------------------
def output_cases(fx: Fixtures) -> list[Case]:
    cases = []
    for name, (where, words) in O.PREPARE_OUTS.items():
        def run(t, where=where, words=words):
            u = O.coco_user(t)
            out = where(u)
            before = O.snapshot(u["user"], u["params"])
            code, err = run_cli(["prepare-data", "--out", str(out), "--params", PARAMS, "--params", str(u["params"])])
            return refusal(code, err, [words, "refusing to write there"],
                           changed=O.snapshot(u["user"], u["params"]) != before)
        cases.append(Case("outputs", f"prepare-data --out {name}", run))

    def not_made(t):
        mine = t / "photos"
        mine.mkdir()
        (mine / "holiday.jpg").write_bytes(b"\xff\xd8 precious")
        before = O.snapshot(mine)
        code, err = run_cli(["prepare-data", "--out", str(mine), "--params", PARAMS, "--params", SMOKE])
        return refusal(code, err, [f"{mine}: exists and was not made by prepare-data"],
                       changed=O.snapshot(mine) != before)

    def a_file(t):
        (t / "afile").write_text("keep")
        code, err = run_cli(["prepare-data", "--out", str(t / "afile"), "--params", PARAMS, "--params", SMOKE])
        return refusal(code, err, ["exists and is not a folder jdnas made"],
                       changed=(t / "afile").read_text() != "keep")

    def own_output(t):
        out = t / "prepared"
        argv = ["prepare-data", "--out", str(out), "--params", PARAMS, "--params", SMOKE]
        codes, errs, problems = [], [], []
        for step in ("first", "again", "legacy"):
            if step == "legacy":
                (out / O.OUTPUT_MARKER).unlink()  # a folder an earlier jdnas wrote, before markers
            code, err = run_cli(argv)
            codes.append(code)
            errs.append(err)
            if step == "first":
                first = O.snapshot(out)
            elif step == "again" and O.snapshot(out) != first:
                problems.append("the same params gave another folder")
        if not (out / O.OUTPUT_MARKER).is_file():
            problems.append("no output marker after the rerun")
        r = handled(0 if codes == [0, 0, 0] else codes, "".join(errs), "replaced; a legacy folder too")
        r.exit = " → ".join(map(str, codes))
        r.problems += problems
        return r

    def out_dot(t):
        (t / "params.yaml").write_text((REPO / "params.yaml").read_text())
        before = O.snapshot(t)
        code, err = run_cli(["prepare-data", "--out", "."], cwd=t)
        return refusal(code, err, ["--out . contains the input --params params.yaml"], changed=O.snapshot(t) != before)

    cases += [Case("outputs", "prepare-data --out a folder it did not make", not_made),
              Case("outputs", "prepare-data --out an existing file", a_file),
              Case("outputs", "prepare-data --out its own earlier output (and a legacy one)", own_output)]
    for name, (make, words) in O.CASES.items():
        def run(t, make=make, words=words):
            argv, keep = make(t, fx["tiny_ckpt"])
            before = O.snapshot(*keep)
            code, err = run_cli(argv)
            return refusal(code, err, [words.format(t=t), "refusing to write there"],
                           changed=O.snapshot(*keep) != before)
        cases.append(Case("outputs", name, run))
    cases += [Case("outputs", "prepare-data --out . in the user's folder", out_dot),
              Case("outputs", "resume_dir on a folder no stage wrote", None,
                   "a library function (jdnas.io.resume_dir), not a command line"),
              Case("outputs", "stale temporaries of dead writers", None,
                   "a library function (jdnas.io.atomic_dir / clean_stale_tmp), not a command line")]
    return cases


# --- faults ------------------------------------------------------------------------------------------
def fault_cases(fx: Fixtures, subprocesses: bool) -> list[Case]:
    cases = []
    for name, (code_, words) in O.OS_FAULTS.items():
        def run(t, code_=code_, words=words):
            out = t / "prepared"
            fail = O._raise(OSError(code_, os.strerror(code_), str(out)))
            code, err = run_cli(["prepare-data", "--out", str(out), "--params", PARAMS, "--params", SMOKE],
                                patch=lambda mp: mp.setattr(tempfile, "mkdtemp", fail))
            r = refusal(code, err, [words.format(out=out), str(out)])
            if out.exists():
                r.problems.append("--out exists afterwards")
            return r
        cases.append(Case("faults", f"prepare-data, {name}", run))

    def full_disk_training(t):
        full = O._raise(OSError(errno.ENOSPC, "No space left", "runs/base/last.pt"))
        build = cli.build_parser
        code, err = run_cli(["train-base", "--params", PARAMS],
                            patch=lambda mp: mp.setattr(cli, "build_parser", O._with_fn(build, "train-base", full)))
        return refusal(code, err, ["the disk is full writing runs/base/last.pt (free some space and rerun: "
                                   "training resumes"])
    cases.append(Case("faults", "train-base, full disk while training", full_disk_training))

    for name, (make, words) in O.PATH_FAULTS.items():
        def run(t, make=make, words=words):
            argv = make(t)
            if argv[0] in ("prepare-data", "import-torchvision"):
                argv += ["--params", PARAMS, "--params", SMOKE]
            return refusal(*run_cli(argv, cwd=t), [words])
        cases.append(Case("faults", name, run))

    for name, (make, words) in O.ANNOTATION_FAULTS.items():
        def run(t, make=make, words=words):
            u = O.coco_user(t)
            ann = make(t / "ann.json")
            C.write_yaml(u["params"], {"data": {"source": "coco", "coco": {
                "train_images": u["train_images"], "train_annotations": str(ann),
                "val_images": u["val_images"], "val_annotations": u["val_annotations"]}}})
            return refusal(*run_cli(["inspect-data", "--params", PARAMS, "--params", str(u["params"])]),
                           [str(ann), words])
        cases.append(Case("faults", f"inspect-data, annotation file: {name}", run))

    def ctrl_c(t):
        build = cli.build_parser
        code, err = run_cli(["arch", "tiny", "--params", PARAMS], patch=lambda mp: mp.setattr(
            cli, "build_parser", O._with_fn(build, "arch", O._raise(KeyboardInterrupt()))))
        return refusal(code, err, ["jdnas: interrupted (Ctrl-C): arch stopped"], expect=130)
    cases.append(Case("faults", "Ctrl-C (in-process, arch)", ctrl_c))

    sub = [("prepare-data, kill -9 mid-run, then rerun", lambda t: interrupted(fx, t, signal.SIGKILL)),
           ("prepare-data, Ctrl-C mid-run, then rerun", lambda t: interrupted(fx, t, signal.SIGINT)),
           ("prepare-data, two concurrent runs into one output", lambda t: concurrent(fx, t))]
    why = "subprocess cases left out (--no-subprocess)"
    cases += [Case("faults", name, run if subprocesses else None, "" if subprocesses else why) for name, run in sub]
    return cases


def _tmps(parent: Path) -> list[Path]:
    return list(parent.glob(".prepared.*.tmp"))


def _same_as_reference(out: Path, ref: Path) -> bool:
    a, b = O.snapshot(out), O.snapshot(ref)
    if sorted(os.path.relpath(k, out) for k in a) != sorted(os.path.relpath(k, ref) for k in b):
        return False
    return all(v == b[str(ref / os.path.relpath(k, out))] for k, v in a.items() if isinstance(v, bytes))


def interrupted(fx: Fixtures, t: Path, sig: int) -> Result:
    """test_an_interrupted_prepare_data_reruns_to_the_uninterrupted_result, one signal."""
    slow, ref = fx["slow_params"], fx["slow_reference"]
    out = t / "prepared"
    proc = O._spawn_prepare(out, slow)
    caught = O._wait_for_tmp(proc, t)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    problems, lines = [], err.strip().splitlines()
    said = [x for x in lines if x.strip() and not PROGRESS.search(x)]
    bars = len(lines) - len(said)
    if "Traceback" in err:
        problems.append("a traceback")
    if caught:
        if out.exists():
            problems.append("a finished-looking --out after the signal")
        if sig == signal.SIGINT:
            if proc.returncode != 130:
                problems.append(f"exit {proc.returncode}, expected 130")
            if not lines or not lines[-1].startswith("jdnas: interrupted (Ctrl-C)"):
                problems.append("the last line is not 'jdnas: interrupted (Ctrl-C) ...'")
            if len(said) != 1:  # the test checks the last line; the run's progress bars may come before it
                problems.append(f"{len(said)} lines on stderr (progress bars aside)")
            if _tmps(t):
                problems.append("its temporaries were left behind")
        elif not _tmps(t):
            problems.append("kill -9 left no temporary folder (the signal came too late?)")
    rerun = O._spawn_prepare(out, slow)
    rerun_err = rerun.communicate(timeout=300)[1]
    if rerun.returncode != 0:
        problems.append(f"the rerun exited {rerun.returncode}: {rerun_err.strip()[-300:]}")
    if _tmps(t):
        problems.append("the rerun left temporaries")
    if rerun.returncode == 0 and not _same_as_reference(out, ref):
        problems.append("the rerun's output differs from an uninterrupted run's")
    if not caught:
        shown = "(the run ended before the signal: only the rerun checked)"
    elif sig == signal.SIGKILL:
        output = f", only progress-bar output ({bars} line{'s' * (bars > 1)})" if bars and not said else ""
        shown = f"(killed: no line of its own{output}; leaves its temporary folder)"
        shown += "; the rerun: same files as an uninterrupted run, no temporaries left" if not problems else ""
    else:
        shown = said[-1] if len(said) == 1 else f"[{len(said)} lines] " + (said[-1] if said else "")
        shown += f" (after progress-bar output, {bars} line{'s' * (bars > 1)})" if bars else ""
    return Result(f"{proc.returncode} → rerun {rerun.returncode}", shown, problems, refused=sig == signal.SIGINT)


def concurrent(fx: Fixtures, t: Path) -> Result:
    """test_two_concurrent_runs_into_one_output."""
    from jdnas.data.prepare import check_prepared
    out = t / "prepared"
    procs = [O._spawn_prepare(out, fx["slow_params"]) for _ in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    codes = [p.returncode for p in procs]
    problems = []
    if 0 not in codes or not all(c in (0, 2) for c in codes):
        problems.append(f"exits {codes}, expected a 0 and 0 or 2")
    if any("Traceback" in e for e in errs):
        problems.append("a traceback")
    try:
        check_prepared(out)
    except Exception as e:  # noqa: BLE001
        problems.append(f"--out is not a prepared folder: {e}")
    if _tmps(t):
        problems.append("temporaries left behind")
    refused = [e.strip().splitlines() for c, e in zip(codes, errs) if c != 0]
    for lines in refused:
        if len(lines) != 1:
            problems.append(f"the refused run printed {len(lines)} lines")
    shown = (refused[0][-1] if refused and refused[0] else "(both finished: one prepared folder)")
    return Result(", ".join(map(str, codes)), shown, problems, refused=False)


# --- latency tables ----------------------------------------------------------------------------------
def predict_argv(table: Path, arch: str = "r18", width: str = "0.25") -> list[str]:
    return ["predict-latency", arch, "--width", width, "--table", str(table)]


def latency_cases(fx: Fixtures) -> list[Case]:
    cases = []
    for name, (corrupt, line, words) in L.CORRUPT.items():
        def run(t, corrupt=corrupt, line=line, words=words):
            damaged = corrupt(list(fx["table_lines"]))
            path = t / "t.csv"
            if isinstance(damaged, bytes):
                path.write_bytes(damaged)
            else:
                path.write_text("\n".join(damaged) + ("\n" if damaged else ""))
            expect = [f"jdnas: error: {path}: ", words]
            if line is not None:
                n = line(damaged) if callable(line) else L._first(damaged, line) if isinstance(line, str) else line
                expect.append(f"line {n}")
            return refusal(*run_cli(predict_argv(path)), expect)
        cases.append(Case("latency", f"table: {name}", run))

    def may_hold(t):  # test_what_a_table_may_hold, the table that loads
        lines = fx["table_lines"]
        lines = L._set(L._set(lines, L._first(lines, "glue"), "ms", "-0.25"), 3, "ms", "3599999.0")
        head = [i for i, x in enumerate(lines, start=1)
                if x.split(",")[0] in ("transform", "fpn_top", "rpn", "roi_heads", "glue")]
        for n in head:
            lines = L._set(lines, n, "settings", "headhash")
        return lines

    def accepted(t):
        (t / "t.csv").write_text("\n".join(may_hold(t)) + "\n")
        return handled(*run_cli(predict_argv(t / "t.csv")),
                       "a negative glue, an entry of almost an hour, a backbone and a head settings hash load")

    def mixed(t):
        (t / "cache.csv").write_text("\n".join(L._set(may_hold(t), 3, "settings", "another_run")) + "\n")
        return refusal(*run_cli(predict_argv(t / "cache.csv")), ["line 3, field settings"])

    def folder(t):
        return refusal(*run_cli(predict_argv(t)), ["is a directory, not a latency table"])

    def loop(t):
        (t / "loop").symlink_to(t / "loop")
        return refusal(*run_cli(predict_argv(t / "loop")), ["symbolic link that leads nowhere"])

    def missing(t):
        return refusal(*run_cli(predict_argv(t / "missing.csv")), ["latency table not found"])

    def outside(arch, width, words):
        return lambda t: refusal(*run_cli(predict_argv(fx["table"], arch, width)), [words])

    def latency_params(override, words):
        def run(t):
            bad = C.write_yaml(t / "bad.yaml", override)
            return refusal(*run_cli(["profile-latency", "--params", PARAMS, "--params", str(bad),
                                     "--data", str(fx["prepared"]), "--out", str(t / "out")]), [words])
        return run

    def no_cuda(t):
        cuda = C.write_yaml(t / "cuda.yaml", {"latency": {"device": "cuda:0"}})
        r = refusal(*run_cli(["profile-latency", "--params", PARAMS, "--params", str(cuda),
                              "--data", str(fx["prepared"]), "--out", str(t / "cli")]), ["no CUDA device"])
        if (t / "cli").exists():
            r.problems.append("--out was written")
        return r

    def other_space(t):
        smoke = fx["smoke_params"]
        live = {"table": str(REPO / smoke["latency"]["table"]), "max_mape": 1000.0}
        other = C.write_yaml(t / "other.yaml", {"latency": live, "model": {"fpn_channels": 24}})
        return refusal(*run_cli(["profile-latency", "--params", PARAMS, "--params", SMOKE, "--params", str(other),
                                 "--data", str(fx["prepared"]), "--out", str(t / "other")]),
                       ["latency.table lacks", "profiled for another space"])

    has_cuda = torch.cuda.is_available()
    cases += [
        Case("latency", "table, accepted: what a table may hold", accepted),
        Case("latency", "table: settings of several runs (the profiler's cache)", mixed),
        Case("latency", "table: a folder", folder),
        Case("latency", "table: a link loop", loop),
        Case("latency", "table: missing", missing),
        Case("latency", "arch outside the table: a width below the grid",
             outside("S16:1x16m2-1x32m32-1x64m64-1x128m128", "1.0", "outside the profiled range")),
        Case("latency", "arch outside the table: bottleneck blocks (r50)",
             outside("r50", "0.25", "no entry for block(block=bottleneck")),
        Case("latency", "params: latency.threads 2 with the cpu_time clock",
             latency_params({"latency": {"clock": "cpu_time", "threads": 2}}, "latency.threads to 1")),
        Case("latency", "params: latency.device tpu",
             latency_params({"latency": {"device": "tpu"}}, "latency.device = 'tpu' is not allowed")),
        Case("latency", "latency.device cuda:0 on a machine without CUDA", None if has_cuda else no_cuda,
             "this machine has CUDA" if has_cuda else ""),
        Case("latency", "pinned latency.table of another space", other_space),
    ]
    return cases


# --- the document ------------------------------------------------------------------------------------
class Paths:
    """Temporary paths in the lines, written as {tmp} (the case's folder), {fixtures} and {repo}."""

    def __init__(self, root: Path):
        self.root = root

    def __call__(self, text: str, t: Path) -> str:
        for path, name in ((t, "{tmp}"), (self.root / "fixtures", "{fixtures}"), (self.root, "{tmpdir}"),
                           (REPO, "{repo}")):
            text = text.replace(str(path), name)
        return text


def cell(text: str, limit: int | None = LINE_CHARS) -> str:
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("|", "\\|").replace("<", "\\<").replace("*", "\\*")


def document(results: dict[str, list[tuple[Case, Result | None]]]) -> str:
    out = ["_Generated by `tools/error_lines.py` from the test suite's bad-input cases: do not edit by hand._",
           "_Regenerate with `.venv/bin/python tools/error_lines.py > docs/error_lines.md`._", "",
           "# The one line `jdnas` prints for each bad input", "",
           "Every case of `tests/test_inputs_params.py`, `tests/test_inputs_artifacts.py`, "
           "`tests/test_inputs_outputs.py` and the latency-table refusals of `tests/test_latency.py`, built as "
           "the test builds it and run through `jdnas.cli.main` (a subprocess where the test starts one). "
           "A refusal is one line on stderr with exit 2 (130 for Ctrl-C); a case marked *handled* is one the "
           "tests expect to succeed. Lines are cut to 200 characters; `{tmp}` is the case's temporary folder, "
           "`{fixtures}` the shared one, `{repo}` the repository.", "",
           "| class | cases run | refused with one line | handled | with a problem | skipped |",
           "|---|---:|---:|---:|---:|---:|"]
    total = [0] * 5
    for key, rows in results.items():
        ran = [r for _, r in rows if r is not None]
        counts = [len(ran), sum(r.refused and not r.problems for r in ran),
                  sum(not r.refused and not r.problems for r in ran), sum(bool(r.problems) for r in ran),
                  sum(r is None for _, r in rows)]
        total = [a + b for a, b in zip(total, counts)]
        out.append(f"| [{CLASSES[key]}](#{anchor(CLASSES[key])}) | " + " | ".join(map(str, counts)) + " |")
    out.append("| **all** | " + " | ".join(f"**{n}**" for n in total) + " |")
    for key, rows in results.items():
        out += ["", f"## {CLASSES[key]}", "", "| case | exit | the one line printed |", "|---|---|---|"]
        for case, r in rows:
            if r is None:
                out.append(f"| {cell(case.name, None)} | – | (skipped: {cell(case.skip, None)}) |")
            else:
                out.append(f"| {cell(case.name, None)} | {r.exit} | {cell(r.line)} |")
    out += ["", "## Cases that differ from what the tests expect", ""]
    bad = [(c, r) for rows in results.values() for c, r in rows if r is not None and r.problems]
    out += [f"- {CLASSES[c.cls]}, *{cell(c.name, None)}*: {cell('; '.join(r.problems), None)}" for c, r in bad] or \
        ["None: every refusal is one line (no traceback) with the words its test checks, every handled case exits 0."]
    out += ["", "## Skipped", ""]
    out += [f"- {CLASSES[c.cls]}, *{cell(c.name, None)}*: {cell(c.skip, None)}"
            for rows in results.values() for c, r in rows if r is None] or ["None."]
    return "\n".join(out) + "\n"


def anchor(title: str) -> str:
    """GitHub's anchor for a heading."""
    return "".join(ch for ch in title.lower().replace(" ", "-") if ch.isalnum() or ch in "-_")


def run_all(args, fx: Fixtures, builders: dict, paths: Paths, root: Path,
            results: dict[str, list[tuple[Case, Result | None]]]) -> None:
    n = 0
    for key in [k for k in CLASSES if not args.only or k in args.only]:
        cases = builders[key](fx)
        results[key] = []
        log(f"{CLASSES[key]}: {len(cases)} cases")
        for i, case in enumerate(cases, start=1):
            if case.run is None:
                log(f"  [{key} {i}/{len(cases)}] {case.name}: skipped ({case.skip})")
                results[key].append((case, None))
                continue
            n += 1
            t = root / f"case{n:03d}"
            t.mkdir()
            began = time.perf_counter()
            try:
                r = case.run(t)
            except Exception:  # noqa: BLE001 - building the case failed: report it, go on
                r = Result("–", "(this script could not build or check the case)",
                           ["the case failed in tools/error_lines.py: " + traceback.format_exc().strip()
                            .splitlines()[-1]])
            r.line = paths(r.line, t)
            r.problems = [paths(p, t) for p in r.problems]
            results[key].append((case, r))
            flag = f"  PROBLEM: {'; '.join(r.problems)}" if r.problems else ""
            log(f"  [{key} {i}/{len(cases)}] {case.name}: exit {r.exit} "
                f"({time.perf_counter() - began:.1f} s){flag}")
            shutil.rmtree(t, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", choices=list(CLASSES), help="run only this class (repeatable)")
    ap.add_argument("--no-subprocess", action="store_true", help="skip the kill -9, Ctrl-C and concurrent runs")
    args = ap.parse_args(argv)
    start, cpu0 = time.perf_counter(), time.process_time()
    signal.signal(signal.SIGALRM, _alarm)
    root = Path(tempfile.mkdtemp(prefix="jdnas-error-lines-")).resolve()
    fx = Fixtures(root / "fixtures")
    paths = Paths(root)
    builders = {"params": params_cases, "artifacts": artifact_cases, "outputs": output_cases,
                "faults": lambda f: fault_cases(f, not args.no_subprocess), "latency": latency_cases}
    results: dict[str, list[tuple[Case, Result | None]]] = {}
    # what a fixture prints while it is built (prepare_data's report) is progress, not the document
    with redirect_stdout(sys.stderr):
        try:
            run_all(args, fx, builders, paths, root, results)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    sys.stdout.write(document(results))
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    log(f"done in {time.perf_counter() - start:.0f} s wall, {time.process_time() - cpu0:.0f} s CPU here "
        f"+ {children.ru_utime + children.ru_stime:.0f} s in subprocesses")
    return 0


if __name__ == "__main__":
    sys.exit(main())
