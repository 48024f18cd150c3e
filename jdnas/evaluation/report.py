"""The report: the joint search beside what a user would otherwise do (DESIGN §10, §11).

`write_report(runs, out, params, data)` reads the finished stages' artifacts under `runs/`,
times every model of the table in one interleaved measurement on `data`'s val images, and
writes `out/summary.csv` (rows `base`, `control`, `prune_kd`, `naive/<step>`, `joint/final`),
`out/report.md` (opening with the verdict: joint vs prune_kd at the same target) and the plots
named in `PLOTS`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from jdnas.config import val_timing
from jdnas.engine.device import resolve_device
from jdnas.errors import JdnasError
from jdnas.io import atomic_path
from jdnas.latency.measure import compare_on_val
from jdnas.models.detector import load_detector
from jdnas.paths import REPORT_PLOTS

PLOTS = REPORT_PLOTS  # the stage's declared outputs
COLUMNS = ["model", "AP", "AP50", "latency_ms", "latency_source", "predicted_latency_ms", "measured_latency_ratio",
           "predicted_latency_ratio", "latency_onnxruntime_ms", "params", "flops", "compute", "compute_unit",
           "cumulative_compute", "target_ms", "meets_target", "meets_target_predicted"]
# where each row's model is, under runs/ (naive steps: baseline/steps/<step>/model.pt)
MODEL_FILES = {"base": "base/model.pt", "control": "control/decay/model.pt", "prune_kd": "prune_kd/kd/model.pt",
               "joint/final": "final/model.pt"}
COMPUTE_RULE = ("Compute is measured around everything a pipeline runs (training, its teachers' forward passes, "
                "minival evaluations, pruning trials), in CPU-seconds on CPU and GPU-seconds on CUDA. A pipeline "
                "that distils from the teacher pool is charged the pool's training: joint = pool + search jobs (the "
                "rounds' candidates and the final fine-tune), "
                "prune_kd = pool + its own; control and the naive pipeline's steps are their own. control and "
                "prune_kd are given the joint search's total; the naive pipeline trains for the iterations its "
                "params give (a real budget: its compute is reported, not matched).")
DEFAULT_TABLE_ERROR = 5.0  # percent: the bound between measured and predicted ratios without a validation.json
STYLE = {"font.size": 11, "axes.titlesize": 12, "legend.fontsize": 9, "figure.dpi": 110}
START_WORDS = {"base": "the base", "pool": "the base's twin in the teacher pool"}  # search.from_pool


# --- inputs ------------------------------------------------------------------------------------
def _need(path: Path) -> Path:
    if not path.is_file():
        raise JdnasError(f"report: missing input {path} (run the stage that writes it first)")
    return path


def _json(path: Path) -> Any:
    try:
        return json.loads(_need(path).read_text())
    except json.JSONDecodeError as e:
        raise JdnasError(f"report: {path} is not valid JSON: {e}") from None


def _csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(_need(path))


def _num(x: Any) -> float:
    """A metric as a float; None or missing (undefined COCO metric, unknown time) becomes NaN."""
    return float("nan") if x is None else float(x)


def _history(path: Path) -> pd.DataFrame:
    """history.csv with numeric columns as floats (empty cells NaN) and `accepted` as bool."""
    h = _csv(path)
    for c in ("round", "ap", "latency_ms", "score", "student_flops", "teacher_flops", "teacher_ap"):
        h[c] = pd.to_numeric(h[c], errors="coerce")
    for c in ("accepted", "control"):
        h[c] = h[c].astype(str).str.lower().eq("true")
    return h


@dataclass
class Runs:
    """Every artifact the report reads, loaded once."""

    base: dict            # runs/base/metrics.json
    final: dict           # runs/final/metrics.json: {"final": ..., "base": ...}
    states: list[dict]    # runs/search/round_<r>/state.json, r = 0..R
    history: pd.DataFrame  # runs/search/history.csv (numbers as floats, accepted as bool)
    search: dict          # runs/search/summary.json
    pool: pd.DataFrame    # runs/teacher_pool/pool.csv
    baseline: dict        # runs/baseline/metrics.json
    control: dict         # runs/control/summary.json
    prune_kd: dict        # runs/prune_kd/summary.json
    root: Path = Path("runs")

    @classmethod
    def load(cls, root: str | Path, rounds: int) -> "Runs":
        root = Path(root)
        s = root / "search"
        return cls(_json(root / "base" / "metrics.json"), _json(root / "final" / "metrics.json"),
                   [_json(s / f"round_{r}" / "state.json") for r in range(rounds + 1)],
                   _history(s / "history.csv"), _json(s / "summary.json"),
                   _csv(root / "teacher_pool" / "pool.csv"), _json(root / "baseline" / "metrics.json"),
                   _json(root / "control" / "summary.json"), _json(root / "prune_kd" / "summary.json"), root)

    @property
    def target_ms(self) -> float:
        return float(self.search["target_ms"])

    @property
    def unit(self) -> str:
        return self.baseline["compute_unit"]


# --- the summary table ---------------------------------------------------------------------------
def _row(model: str, m: dict, predicted: Any, measured: Any, compute: Any, unit: str, cumulative: Any,
         target_ms: float) -> dict:
    predicted, measured = _num(predicted), _num(measured)
    return {"model": model, "AP": _num(m.get("AP")), "AP50": _num(m.get("AP50")),
            "latency_ms": predicted if math.isnan(measured) else measured,
            "latency_source": "predicted" if math.isnan(measured) else "measured",
            "predicted_latency_ms": predicted, "latency_onnxruntime_ms": _num(m.get("latency_onnxruntime_ms")),
            "params": m.get("params"), "flops": m.get("flops"),
            "compute": _num(compute), "compute_unit": unit, "cumulative_compute": _num(cumulative),
            "meets_target_predicted": bool(predicted <= target_ms)}


def summary_rows(r: Runs) -> dict[str, dict]:
    """One row per model (base, naive/<step>..., joint/final), keyed by model name.

    Compute is what produced the model: the base's training CPU-seconds, each naive step's own
    compute (cumulative_compute adds up the pipeline so far), the search's candidate jobs.
    """
    base = {**r.base, "latency_onnxruntime_ms": r.final["base"].get("latency_onnxruntime_ms")}  # evaluate_final's
    rows = [_row("base", base, r.states[0]["latency_ms"], r.final["base"].get("latency_ms"),
                 r.base.get("train_cpu_seconds"), "cpu_seconds", r.base.get("train_cpu_seconds"), r.target_ms)]
    for name, m in (("control", r.control), ("prune_kd", r.prune_kd)):
        rows.append(_row(name, m, m["latency_ms"], None, m["compute"], m["compute_unit"], m["compute"], r.target_ms))
    total = 0.0
    for step in r.baseline["steps"]:
        total += step["compute"]
        rows.append(_row(f"naive/{step['step']}", step, step["latency_ms"], step.get("measured_latency_ms"),
                         step["compute"], r.unit, total, r.target_ms))
    joint = r.prune_kd["joint_compute"]  # the pool's training + the search's jobs
    rows.append(_row("joint/final", r.final["final"], r.states[-1]["latency_ms"], r.final["final"].get("latency_ms"),
                     joint, r.search["compute_unit"], joint, r.target_ms))
    return {row["model"]: row for row in rows}


def _measured(row: dict) -> bool:
    return str(row.get("latency_source", "")).startswith("measured")


def judge_rows(rows: dict[str, dict], r: Runs) -> None:
    """Each row's latency ratios to the base, measured and predicted, and its target check in the
    terms of its `latency_ms`: a measured row against the target on the measured axis (the
    target's ratio x the base's measured latency: the line ap_vs_latency.png draws), a predicted
    one against the predicted target. `meets_target_predicted` keeps the predicted check of every
    row. Run once the latencies are final (after `measure_rows`)."""
    base = rows["base"]
    base_measured = _num(base["latency_ms"]) if _measured(base) else float("nan")
    base_predicted = _num(base["predicted_latency_ms"])
    target_measured = target_measured_ms(r, rows)
    for row in rows.values():
        measured = _num(row["latency_ms"]) if _measured(row) else float("nan")
        row["measured_latency_ratio"] = measured / base_measured if base_measured else float("nan")
        row["predicted_latency_ratio"] = _num(row["predicted_latency_ms"]) / base_predicted if base_predicted \
            else float("nan")
        if math.isfinite(measured) and math.isfinite(target_measured):
            row["target_ms"], row["meets_target"] = target_measured, bool(measured <= target_measured)
        else:  # no measurement (or none of the base's): the row is judged, and drawn, by its prediction
            row["target_ms"], row["meets_target"] = r.target_ms, row["meets_target_predicted"]


def table_error(r: Runs, device: str) -> tuple[float, str]:
    """The latency table's error, percent, and where it comes from: the validation MAPE of
    runs/latency/<device>/validation.json when there is one, else DEFAULT_TABLE_ERROR."""
    path = r.root / "latency" / device / "validation.json"
    try:
        mape = json.loads(path.read_text()).get("mape_percent")
    except (OSError, ValueError, AttributeError):
        mape = None
    if isinstance(mape, (int, float)) and not isinstance(mape, bool) and math.isfinite(mape) and mape >= 0:
        return float(mape), f"the latency table's validation MAPE ({path})"
    return DEFAULT_TABLE_ERROR, f"the default bound (no validation MAPE in {path})"


def disagreements(rows: dict[str, dict], bound: float) -> list[tuple[str, float]]:
    """The rows whose measured and predicted ratios to the base differ by more than `bound`
    percent (of the measured ratio), with the difference."""
    out = []
    for name, row in rows.items():
        m, p = _num(row.get("measured_latency_ratio")), _num(row.get("predicted_latency_ratio"))
        if math.isfinite(m) and math.isfinite(p) and m > 0:
            diff = 100 * abs(p - m) / m
            if diff > bound:
                out.append((name, diff))
    return out


def model_files(r: Runs) -> dict[str, Path]:
    """The checkpoint of every summary row, by row name."""
    files = {name: r.root / f for name, f in MODEL_FILES.items()}
    files.update({f"naive/{s['step']}": r.root / "baseline" / "steps" / s["step"] / "model.pt"
                  for s in r.baseline["steps"]})
    return files


def measure_rows(rows: dict[str, dict], r: Runs, data: Path, device: torch.device, timing: dict[str, Any]) -> None:
    """Replace every row's latency by one interleaved measurement of all the rows' models on val
    images (`timing`: `config.val_timing`): what differs between the rows is then the models, not
    the machine's load."""
    files = {name: f for name, f in model_files(r).items() if name in rows}
    models = {name: load_detector(_need(f), device) for name, f in files.items()}
    ms = compare_on_val(models, data, device, models["base"].head_cfg["max_size"], **timing)
    for name, v in ms.items():
        rows[name].update(latency_ms=v, latency_source="measured (one interleaved run)")


# --- correlation -------------------------------------------------------------------------------------
def _pearson(x: pd.Series, y: pd.Series) -> float:
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def correlations(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """(Spearman, Pearson) over the pairs where both are finite; NaN with fewer than 3 or no spread."""
    df = pd.DataFrame({"x": x, "y": y}, dtype=float).replace([np.inf, -np.inf], np.nan).dropna()
    return _pearson(df.x.rank(), df.y.rank()), _pearson(df.x, df.y)


# --- plots -----------------------------------------------------------------------------------------
def _save(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _scatter(ax: plt.Axes, x: Any, y: Any, **kw: Any) -> Any:
    """ax.scatter, leaving a series with no finite point out of the legend."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if not (np.isfinite(x) & np.isfinite(y)).any():
        kw["label"] = "_nolegend_"
    return ax.scatter(x, y, **kw)


def plot_trajectory(r: Runs, path: Path) -> None:
    """Score and AP of the current state per round, every candidate's score, accepted ones starred."""
    h = r.history
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rounds = [s["round"] for s in r.states]
    ax.plot(rounds, [_num(s["score"]) for s in r.states], "o-", color="C0", label="state score")
    ax.plot(rounds, [_num(s["ap"]) for s in r.states], "s--", color="C1", label="state AP (minival)")
    _scatter(ax, h["round"], h["score"], color="grey", alpha=0.6, label="candidate score")
    acc = h[h["accepted"]]
    _scatter(ax, acc["round"], acc["score"], marker="*", s=220, color="C3", zorder=3, label="accepted candidate")
    ax.set(title=f"Joint search trajectory (target {r.target_ms:.2f} ms, penalty {r.search['penalty']:g})",
           xlabel="round", ylabel="score / AP (%)", xticks=rounds)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    _save(fig, path)


def target_measured_ms(r: Runs, rows: dict[str, dict]) -> float:
    """The latency target on the measured axis: the target's ratio to the base's predicted latency,
    times the base's measured latency (NaN when the base has no measured latency)."""
    base = rows["base"]
    return r.target_ms / r.states[0]["latency_ms"] * _num(base["latency_ms"]) if _measured(base) else float("nan")


def plot_ap_vs_latency(r: Runs, rows: dict[str, dict], path: Path) -> list[str]:
    """Every summary row: val AP vs latency (measured where measured: filled markers; predicted
    otherwise: hollow), each point labelled; the target drawn in the terms of the points (the
    measured target line for measured points, the predicted target for predicted ones) and each
    point's 'meets/misses target' read against its own line; the legend sits beside the axes so
    it never covers a point. Returns the legend's labels."""
    fig, ax = plt.subplots(figsize=(10.5, 5))
    style = {"base": ("D", "C2"), "control": ("o", "C7"), "prune_kd": ("^", "C1"), "joint/final": ("*", "C3")}
    for i, (name, row) in enumerate(rows.items()):
        marker, color = style.get(name, ("s", f"C{4 + i % 5}"))
        x, y = _num(row["latency_ms"]), _num(row["AP"])
        measured = _measured(row)
        _scatter(ax, [x], [y], marker=marker, s=220 if name == "joint/final" else 110,
                 color=color if measured else "none", edgecolor="k" if measured else color,
                 linewidth=1 if measured else 2, zorder=3,
                 label=f"{name} ({'meets' if row['meets_target'] else 'misses'} target, "
                       f"{'measured' if measured else 'predicted'})")
        if np.isfinite(x) and np.isfinite(y):
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=9)
    target = target_measured_ms(r, rows)
    kinds = {_measured(row) and math.isfinite(target) for row in rows.values()}  # judged by measurement?
    if True in kinds:
        ax.axvline(target, color="k", ls=":", label=f"latency target, measured ({target:.2f} ms = "
                   f"{r.target_ms / r.states[0]['latency_ms']:.2f}x the base's measured)")
    if False in kinds:
        ax.axvline(r.target_ms, color="grey", ls="--", label=f"latency target, predicted ({r.target_ms:.2f} ms)")
    ax.margins(x=0.1, y=0.08)  # room for the labels of the points at the edges
    terms = ("measured" if kinds == {True} else "predicted" if kinds == {False}
             else "filled: measured, hollow: predicted")
    ax.set(title="Every pipeline's result: val AP vs latency", xlabel=f"latency (ms per image, {terms})",
           ylabel="val AP (%)")
    ax.grid(alpha=0.3)
    legend = ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    labels = [t.get_text() for t in legend.get_texts()]
    _save(fig, path)
    return labels


def plot_teacher_pool(r: Runs, path: Path) -> None:
    """The sampled teacher-pool members: AP vs latency, one colour per role."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (role, g) in enumerate(r.pool.groupby("role", sort=False)):
        _scatter(ax, pd.to_numeric(g["latency_ms"], errors="coerce"), pd.to_numeric(g["AP"], errors="coerce"),
                   s=70, color=f"C{i}", label=role)
    ax.set(title="Elastic teacher pool: sampled members", xlabel="latency (ms)", ylabel="AP (%)")
    ax.grid(alpha=0.3)
    ax.legend(title="role", loc="best")
    _save(fig, path)


def plot_student_vs_teacher(r: Runs, path: Path) -> None:
    """Student FLOPs vs its teacher's FLOPs per candidate, coloured by score, with correlations."""
    h = r.history
    x, y = h["teacher_flops"] / 1e9, h["student_flops"] / 1e9
    rho, pr = correlations(x, y)
    fig, ax = plt.subplots(figsize=(7, 5))
    known = h["score"].notna()
    pts = _scatter(ax, x[known], y[known], c=h["score"][known], cmap="viridis", s=60, label="candidate")
    _scatter(ax, x[~known], y[~known], s=60, facecolor="none", edgecolor="grey", label="candidate, score unknown")
    acc = h["accepted"]
    _scatter(ax, x[acc], y[acc], s=200, facecolor="none", edgecolor="C3", lw=2, label="accepted")
    if known.any():
        fig.colorbar(pts, ax=ax, label="candidate score")
    ax.set(title=f"Student vs teacher capacity (n={len(h)})\nSpearman ρ = {_fmt(rho)}, Pearson r = {_fmt(pr)}",
           xlabel="teacher FLOPs (G)", ylabel="student FLOPs (G)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    _save(fig, path)


# --- report.md -------------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return "–" if math.isnan(v) else f"{v:,.2f}"
    return "–" if v is None else str(v)


def _md_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _same_terms(a: dict, b: dict) -> tuple[bool, bool, str]:
    """Both rows' target checks in the same terms: measured when both were measured, else both
    predicted (a measured check is never set against a predicted one)."""
    if _measured(a) and _measured(b) and "meets_target_predicted" in a and "meets_target_predicted" in b:
        return bool(a["meets_target"]), bool(b["meets_target"]), "measured"
    return (bool(a.get("meets_target_predicted", a["meets_target"])),
            bool(b.get("meets_target_predicted", b["meets_target"])), "predicted")


def _wins(a: dict, b: dict) -> bool:
    """Whether row a beats row b at the same target: meeting it first (both in the same terms), then
    AP, then latency."""
    ma, mb, _ = _same_terms(a, b)
    return (ma, _num(a["AP"]), -_num(a["latency_ms"])) > (mb, _num(b["AP"]), -_num(b["latency_ms"]))


def verdict(rows: dict[str, dict]) -> str:
    """One sentence from the table: joint search vs prune + KD at the same target."""
    j, p = rows["joint/final"], rows["prune_kd"]

    def pct(a: float, b: float) -> str:
        return f"{100 * (a / b - 1):+.0f}%" if b else "–"
    who = ("**the joint search wins**" if _wins(j, p) else "**prune + KD wins**" if _wins(p, j) else "**a tie**")
    mj, mp, _ = _same_terms(j, p)
    return (f"At the same latency target, the joint search vs pruning + KD: val AP {_fmt(_num(j['AP']))} vs "
            f"{_fmt(_num(p['AP']))} (ΔAP {_num(j['AP']) - _num(p['AP']):+.2f}), latency {_fmt(_num(j['latency_ms']))} "
            f"vs {_fmt(_num(p['latency_ms']))} ms ({pct(_num(j['latency_ms']), _num(p['latency_ms']))}), compute "
            f"{_fmt(_num(j['compute']))} vs {_fmt(_num(p['compute']))} {j['compute_unit']} "
            f"({pct(_num(j['compute']), _num(p['compute']))}); target met: {_fmt(mj)} vs "
            f"{_fmt(mp)}: {who}.")


def promise(rows: dict[str, dict]) -> str:
    """The report's first line: did the final student keep the product's promise, faster (measured,
    in this report's interleaved timing) and at least as accurate as the base? Either broken half
    is named as such."""
    j, b = rows["joint/final"], rows["base"]
    ratio = _num(j["latency_ms"]) / _num(b["latency_ms"])
    delta = _num(j["AP"]) - _num(b["AP"])
    meets = j.get("meets_target_predicted", j["meets_target"])  # the line says "predicted"
    fast = (f"meets the latency target (predicted; measured {ratio:.2f}x the base's latency)" if meets
            else f"**misses the latency target** (predicted; measured {ratio:.2f}x the base's latency)")
    acc = (f"keeps the base's accuracy (val AP {_fmt(_num(j['AP']))} vs {_fmt(_num(b['AP']))}, {delta:+.2f})"
           if delta >= 0 else f"**is less accurate than the base** (val AP {_fmt(_num(j['AP']))} vs "
           f"{_fmt(_num(b['AP']))}, {delta:+.2f})")
    return f"**The final student {fast} and {acc}.**" if meets and delta >= 0 else \
        f"The final student {fast} and {acc}."


def search_steps(r: Runs) -> list[dict]:
    """Per round, the candidate the search moved to: its action, teacher (and the teacher's
    minival AP), the student's minival AP and predicted latency, and its gain over the round's
    control (the same student fine-tuned alike without an action; 0 when the control won)."""
    h, steps = r.history, []
    for rnd, g in h.groupby("round", sort=True):
        won, control = g[g["accepted"]], g[g["control"]]
        if won.empty:
            continue
        w = won.iloc[0]
        c_ap = float(control["ap"].iloc[0]) if not control.empty else float("nan")
        steps.append({"round": int(rnd), "action": "none (control)" if w["control"] else w["action"],
                      "teacher": w["teacher"], "teacher_ap": _num(w.get("teacher_ap")), "student_ap": float(w["ap"]),
                      "control_ap": c_ap, "gain_over_control": float(w["ap"]) - c_ap,
                      "latency_ms": float(w["latency_ms"]), "meets_target": bool(w["latency_ms"] <= r.target_ms)})
    return steps


def latency_shares(r: Runs) -> list[dict]:
    """Predicted latency per part of the base and the final student: ms and share of the total."""
    rows = []
    for name in ("base", "final"):
        parts = r.final[name].get("predicted_breakdown_ms") or {}
        total = parts.get("total") or float("nan")
        rows += [{"model": name, "part": k, "ms": float(v), "share_percent": 100 * float(v) / total}
                 for k, v in parts.items() if k != "total"]
    return rows


def agreement_lines(rows: dict[str, dict], bound: float, source: str) -> list[str]:
    """One line per row whose measured and predicted ratios to the base differ by more than the
    table's error; one line saying so when none does; one naming the rows without a measurement."""
    lines = []
    for name, diff in disagreements(rows, bound):
        row = rows[name]
        terms = ("the two checks disagree: " + ("meets" if row["meets_target"] else "misses")
                 + " the target measured, " + ("meets" if row["meets_target_predicted"] else "misses")
                 + " it predicted" if row["meets_target"] != row["meets_target_predicted"] else
                 "both checks agree (" + ("meets" if row["meets_target"] else "misses") + " the target)")
        lines.append(f"- **{name}**: measured {row['measured_latency_ratio']:.3f}x the base's latency, predicted "
                     f"{row['predicted_latency_ratio']:.3f}x: they differ by {diff:.1f}%, more than the table's "
                     f"error ({bound:.2f}%); {terms}.")
    if not lines:
        lines.append(f"- Every measured row's ratio to the base is within {bound:.2f}% of its predicted ratio.")
    unmeasured = [n for n, row in rows.items() if not math.isfinite(_num(row.get("measured_latency_ratio")))]
    if unmeasured:
        lines.append(f"- No measured latency for {', '.join(unmeasured)}: judged by the prediction only.")
    return [f"Bound: {source}, {bound:.2f}%.", ""] + lines


def _markdown(r: Runs, rows: dict[str, dict], device: str) -> str:
    b = r.baseline
    bound, source = table_error(r, device)
    target = target_measured_ms(r, rows)
    j = rows["joint/final"]
    _, _, verdict_terms = _same_terms(j, rows["prune_kd"])
    measured_check = (f" (predicted; measured: **{_fmt(bool(j['meets_target']))}**, "
                      f"{_fmt(_num(j['latency_ms']))} vs {_fmt(target)} ms)" if _measured(j) and math.isfinite(target)
                      else " (predicted; no measured latency)")
    intro = [
        "# Joint-DetNAS report", "",
        promise(rows), "",
        verdict(rows), "",
        f"The verdict's 'target met' is the {verdict_terms} check of both rows"
        + (" (measured latency against the measured target line)." if verdict_terms == "measured" else
           " (not every row has a measured latency)."), "",
        "Compared on the same data and latency target: the base detector; `control`, the base fine-tuned for "
        "the joint search's compute (no action, no KD); `prune_kd`, the base pruned greedily over the same "
        "whole-detector space to the target, then distilled from the pool's largest teacher, for the same "
        "compute; the naive pipeline (NAS → retrain → prune → KD) step by step; and the joint search "
        "(one student lineage on one schedule, a screened move and its teacher chosen per round, weight "
        "inheritance + KD). AP is COCO AP (%) on val; "
        "search-time AP is on minival.", "",
        f"- Latency target: **{r.target_ms:.2f} ms** predicted on {device} "
        f"({r.search['target_ms'] / r.states[0]['latency_ms']:.2f}x the base's)"
        + (f"; the pipelines cut to {r.search['aim_ms']:.2f} ms (`search.latency_margin`: the table's ratio "
           "errs low on trained students)." if _num(r.search.get("aim_ms", r.target_ms)) < r.target_ms else "."),
        f"- {COMPUTE_RULE}",
        f"- Search schedule: {r.search.get('iters', 0)} lineage iterations from "
        f"{START_WORDS[r.search.get('start', 'base')]} (`search.from_pool`; prune_kd starts alike), the last "
        f"{r.search.get('final_iters', 0)} after the last round (the schedule's tail), minival AP "
        f"{_fmt(_num(r.states[-1]['ap']))} → {_fmt(_num(r.search.get('final_minival_ap') or r.states[-1]['ap']))}; "
        f"compute split ({r.search['compute_unit']}): "
        + ", ".join(f"{k} {_fmt(_num(v))}" for k, v in r.search.get("compute_split", {}).items()) + ".",
        f"- Naive pipeline: spent {_fmt(_num(b['spent']))} {b['compute_unit']} "
        f"({', '.join(f'{k} {v:,} it' for k, v in b.get('iters', {}).items())}).",
        f"- Final student: predicted latency **{_fmt(_num(r.final['final'].get('predicted_latency_ratio')))}x** "
        f"the base's, measured **{_fmt(_num(rows['joint/final']['latency_ms']) / _num(rows['base']['latency_ms']))}x**;"
        f" meets the target: **{_fmt(bool(r.final['final'].get('meets_target')))}**{measured_check}. Exported to ONNX "
        f"(`runs/final/model.onnx`) and timed under onnxruntime on the CPU: "
        f"**{_fmt(_num(r.final['final'].get('latency_ratio_onnxruntime')))}x** the base's "
        f"({_fmt(_num(r.final['final'].get('latency_onnxruntime_ms')))} vs "
        f"{_fmt(_num(r.final['base'].get('latency_onnxruntime_ms')))} ms).", "",
        "## Models", "",
        "latency_ms: every model timed in one interleaved measurement (latency_source: measured, or predicted "
        "where a model was not timed); measured_latency_ratio and predicted_latency_ratio: its latency over the "
        "base's, each in its own terms. meets_target compares latency_ms with target_ms in the same terms: "
        f"a measured row with the measured target line ({_fmt(target)} ms, the target's "
        f"{r.target_ms / r.states[0]['latency_ms']:.2f}x the base's measured latency), a predicted one with the "
        f"predicted target ({r.target_ms:.2f} ms); meets_target_predicted is the predicted check of every row. "
        "Compute is what produced the model, cumulative_compute adds up its pipeline.", "",
        _md_table(list(rows.values()), COLUMNS), "",
        "## Predicted vs measured", "",
        *agreement_lines(rows, bound, source), "",
        "## Teacher per round", "",
        _md_table([{**s, "accepted": s.get("accepted") or "–"} for s in r.states],
                  ["round", "teacher", "student_arch", "ap", "latency_ms", "score", "accepted"]), "",
        "ap on minival, latency predicted; round 0 is the base detector.", "",
        "## Search steps", "",
        "Per round, the candidate the search moved to (the control: the current student fine-tuned alike, "
        "no action). Gain over control = its minival AP minus the control's: what the architecture change "
        "bought beyond the extra training.", "",
        _md_table(search_steps(r), ["round", "action", "teacher", "teacher_ap", "student_ap", "control_ap",
                                    "gain_over_control", "latency_ms", "meets_target"]), "",
        "## Where the latency goes", "",
        "Predicted per part by the latency table (ms and share of the total).", "",
        _md_table(latency_shares(r), ["model", "part", "ms", "share_percent"]), "",
        "## Plots", ""]
    captions = ["Search trajectory", "AP vs latency", "Teacher pool", "Student vs teacher capacity"]
    return "\n".join(intro + [f"![{c}]({p})\n" for c, p in zip(captions, PLOTS)])


def write_report(runs: str | Path, out: str | Path, params: dict, data: str | Path | None = None) -> dict:
    """Write out/summary.csv, the plots in PLOTS and out/report.md (last); return the summary rows by model.

    With `data` (the prepared folder) every row's model is timed in one interleaved measurement;
    without it the latencies the stages measured themselves are used. Reads params["search"]["rounds"]
    (which round states exist), the device and latency settings.
    """
    out = Path(out)
    r = Runs.load(runs, int(params["search"]["rounds"]))
    rows = summary_rows(r)
    if data is not None:
        measure_rows(rows, r, Path(data), resolve_device(params["device"]), val_timing(params))
    judge_rows(rows, r)
    with atomic_path(out / "summary.csv") as tmp:
        pd.DataFrame(list(rows.values()), columns=COLUMNS).to_csv(tmp, index=False)
    with plt.rc_context(STYLE):
        plot_trajectory(r, out / PLOTS[0])
        plot_ap_vs_latency(r, rows, out / PLOTS[1])
        plot_teacher_pool(r, out / PLOTS[2])
        plot_student_vs_teacher(r, out / PLOTS[3])
    device = params.get("latency", {}).get("device", "the target device")
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(_markdown(r, rows, device) + "\n")
    return rows
