"""A search round's files: its folder, the lineage's state after it, its finalists, and the
steps of a round with nothing to train (a round after the search stopped, a finalist slot the
round does not fill), which pass the lineage through.

Light on purpose (no torch): Snakemake runs every step as its own job, and a job that only
passes files through should not pay for importing torch (`jdnas search-step` takes this path
first).
"""
from __future__ import annotations

import shutil
from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from jdnas.io import atomic_path, load_json, write_json
from jdnas.paths import SEARCH

ROOT = Path(SEARCH)  # the search's folder unless a step is given another


@dataclass(frozen=True)
class Candidate:
    round: int
    index: int
    action: str            # the move: actions joined by "+", or "none" (the control)
    teacher: str
    screen_ap: float | None = None
    latency_ms: float | None = None


@dataclass
class State:
    """The search's state after a round."""

    round: int
    student_arch: str
    student_head: str
    teacher: str
    ap: float
    ap50: float
    latency_ms: float       # predicted by the latency table
    target_ms: float
    score: float
    stale: int = 0          # rounds since the architecture last changed
    stopped: bool = False
    accepted: str | None = None   # "cand_k" taken this round
    it: int = 0             # lineage iterations done (the position in the schedule)

    @property
    def meets_target(self) -> bool:
        return self.latency_ms <= self.target_ms


def round_dir(r: int, root: Path = ROOT) -> Path:
    return root / f"round_{r}"


def finish_dir(root: Path = ROOT) -> Path:
    """The search's last step: the lineage trained to the end of its schedule."""
    return root / "finish"


def read_state(r: int, root: Path = ROOT) -> State:
    return load_state(round_dir(r, root) / "state.json")


def load_state(path: Path) -> State:
    names = [f.name for f in fields(State)]
    obj = load_json(path, [f.name for f in fields(State) if f.default is MISSING])
    return State(**{k: v for k, v in obj.items() if k in names})


def write_state(d: Path, state: State, **extra: Any) -> None:
    """state.json, written last: its presence means the step is done."""
    write_json(d / "state.json", {**asdict(state), "meets_target": state.meets_target, **extra})


# --- steps with nothing to train ------------------------------------------------------------------
def propose_nothing(r: int, root: Path = ROOT) -> dict[str, Any] | None:
    """Round r after the search stopped: no finalist (proposals.json); None when it has not stopped."""
    if not read_state(r - 1, root).stopped:
        return None
    out: dict[str, Any] = {"candidates": [], "compute": {}}
    round_dir(r, root).mkdir(parents=True, exist_ok=True)
    write_json(round_dir(r, root) / "proposals.json", out)
    return out


def skip_slot(r: int, k: int, root: Path = ROOT) -> dict[str, Any] | None:
    """Finalist slot k of round r when the round has fewer finalists (or none): result.json says
    it was skipped; None when slot k holds a finalist."""
    if k < len(load_json(round_dir(r, root) / "proposals.json", ["candidates"])["candidates"]):
        return None
    out = round_dir(r, root) / f"cand_{k}"
    out.mkdir(parents=True, exist_ok=True)
    result = {"round": r, "index": k, "skipped": True}
    write_json(out / "result.json", result)
    return result


def trained_finalists(r: int, root: Path = ROOT) -> list[dict[str, Any]]:
    """The result.json of every finalist round r trained."""
    results = [load_json(p, ["index", "skipped"]) for p in sorted(round_dir(r, root).glob("cand_*/result.json"))]
    return [x for x in results if not x.get("skipped")]


def pass_round(r: int, root: Path = ROOT) -> State | None:
    """Round r's selection when no finalist trained: the lineage of round r - 1 passed through
    unchanged (its files copied), the search stopped; None when a finalist trained."""
    if trained_finalists(r, root):
        return None
    prev, d = read_state(r - 1, root), round_dir(r, root)
    for name in ("student.pt", "lineage.pt"):
        if (round_dir(r - 1, root) / name).is_file():
            with atomic_path(d / name) as tmp:
                shutil.copyfile(round_dir(r - 1, root) / name, tmp)
    state = replace(prev, round=r, stale=prev.stale + (not prev.stopped), accepted=None, stopped=True)
    write_state(d, state, decisions=[], compute={})
    return state


def pass_through(step: str, r: int, k: int | None, root: Path = ROOT) -> Any:
    """A search step's output where it has nothing to train (see above), else None."""
    if step == "propose":
        return propose_nothing(r, root)
    if step == "candidate":
        return skip_slot(r, k or 0, root)
    if step == "select":
        return pass_round(r, root)
    return None
