"""Ablation of the joint search: each of its pieces switched off in turn, against prune_kd.

Reruns the search (and prune_kd, matched to the full search's compute) from a finished run's
cached data, base, teacher pool and latency table, so only the search differs between rows:

    .venv/bin/python bench/search_ablation.py --run . --out runs/bench/ablation [--jobs 2]
    .venv/bin/python bench/search_ablation.py --run . --out runs/bench/ablation --correlation

Rows: full, the target reached over 5 rounds (`search.cut_rounds`) instead of 1, continuous
schedule off (every segment restarts its schedule, momentum and adapters), screening off (moves
drawn at random), halving off (one finalist), pairing off (own seeds, raw scores), teacher moves
off, no moves at all under the target (the control alone: the headroom unused), KD off
(`kd_weight: 0`), the lineage from the base instead of its twin in the pool (`search.from_pool`),
and prune_kd. Columns: val AP, the measured latency ratio to the base
(one interleaved measurement of every row), the predicted ratio and the compute.
`--seeds N` instead runs each variant (`--only`, default full) and prune_kd matched to it over N
search seeds and prints the mean and sd of their val AP.
`--correlation` also screens every cut of the base, trains each for `search.cut_trial_iters` and
prints the Spearman rank correlation of screen AP and trained minival AP (how far the screen
can be trusted to pick finalists).
"""
from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from common import table  # noqa: E402

VARIANTS: dict[str, dict[str, Any]] = {
    "full": {},
    "no continuous schedule": {"search": {"continuous": False}},
    "no screening": {"search": {"screen": False}},
    "cuts over 5 rounds": {"search": {"cut_rounds": 5}},
    "no halving (1 finalist)": {"search": {"cut_candidates": 1, "candidates": 1, "teacher_moves": 0}},
    "no pairing": {"search": {"paired": False}},
    "no teacher moves": {"search": {"teacher_moves": 0}},
    "no moves under the target": {"search": {"candidates": 1, "teacher_moves": 0}},
    "no KD": {"train_student": {"kd_weight": 0.0}},
    "lineage from the base": {"search": {"from_pool": False}},
}


def _paths(run: Path) -> dict[str, Path]:
    import yaml
    params = yaml.safe_load((run / "params.yaml").read_text())
    device = params.get("latency", {}).get("device", "cpu")
    return {"data": run / "data" / "prepared", "base": run / "runs" / "base" / "model.pt",
            "supernet": run / "runs" / "teacher_pool" / "supernet.pt",
            "table": run / "runs" / "latency" / device / "table.csv"}


PARAMS: list[Path] = []  # --params (default: the run's params.yaml)


def _params(run: Path, override: dict) -> dict:
    from jdnas.config import load_params, merge
    return merge(load_params(PARAMS or [run / "params.yaml"]), override, source="ablation")


def _slug(name: str) -> str:
    return name.replace(" ", "_").replace("(", "").replace(")", "").replace("=", "")


def run_variant(run: str, out: str, name: str, seed: int | None = None) -> dict[str, Any]:
    """One search variant into out/<name>: its final student and summary (`seed`: the search's
    own, the data, base, pool and table being the run's)."""
    import torch
    torch.set_num_threads(1)
    from jdnas.joint.search import Context, run_search
    run_p, p = Path(run), _paths(Path(run))
    params = _params(run_p, {**VARIANTS[name.split(" seed=")[0]], **({"seed": seed} if seed is not None else {})})
    root = Path(out) / _slug(name)
    ctx = Context(params, p["data"], p["supernet"], p["table"], p["base"], root)
    state = run_search(ctx)
    summary = json.loads((root / "summary.json").read_text())
    return {"name": name, "model": str(root / "finish" / "student.pt"), "predicted_ms": state.latency_ms,
            "compute": summary["compute"], "unit": summary["compute_unit"], "split": summary["compute_split"],
            "summary": str(root / "summary.json"), "meets_target": state.meets_target}


def run_prune_kd(run: str, out: str, summary: str, seed: int | None = None, name: str | None = None) -> dict[str, Any]:
    """prune_kd matched to the compute of the search whose `summary` it is given."""
    import torch
    torch.set_num_threads(1)
    from jdnas.baselines.matched import run_matched
    run_p, p = Path(run), _paths(Path(run))
    name = name or ("prune_kd" if seed is None else f"prune_kd seed={seed}")
    res = run_matched("prune_kd", _params(run_p, {} if seed is None else {"seed": seed}), p["data"], p["table"],
                      p["base"], p["supernet"], summary, Path(out) / _slug(name))
    return {"name": name, "model": str(Path(out) / _slug(name) / "kd" / "model.pt"),
            "predicted_ms": res["latency_ms"], "compute": res["compute"], "unit": res["compute_unit"],
            "meets_target": res["meets_target"]}


def measure(rows: list[dict], run: Path) -> None:
    """Val AP of every row, and latency of every row and the base in one interleaved measurement."""
    from jdnas.config import val_timing
    from jdnas.engine.loop import evaluate
    from jdnas.latency import LatencyTable
    from jdnas.latency.measure import compare_on_val
    from jdnas.models.arch import Head
    from jdnas.models.detector import load_detector
    import torch
    p = _paths(run)
    params = _params(run, {})
    cpu = torch.device("cpu")
    models = {r["name"]: load_detector(r["model"]) for r in rows}
    base = load_detector(p["base"])
    ms = compare_on_val({**models, "base": base}, p["data"], cpu, base.head_cfg["max_size"], **val_timing(params))
    base_pred = LatencyTable.load(p["table"]).predict(base.arch, Head.of(base.head_cfg))
    for r in rows:
        r["ap"] = evaluate(models[r["name"]], p["data"] / "val.json", params["eval"]["batch_size"], cpu)["AP"]
        r["measured_ratio"] = ms[r["name"]] / ms["base"]
        r["predicted_ratio"] = r["predicted_ms"] / base_pred


def screen_correlation(run: Path, out: Path) -> dict[str, float]:
    """Spearman correlation, over every cut of the base, of screen AP and minival AP after a trial."""
    import pandas as pd
    import torch
    torch.set_num_threads(1)
    from jdnas.joint.lineage import Lineage, apply_moves
    from jdnas.joint.search import CUT_KINDS, Context, _evaluate, _train, Spent, candidate_actions
    from jdnas.models.detector import load_detector
    from jdnas.models.teacher_gene import largest_gene
    p = _paths(run)
    ctx = Context(_params(run, {}), p["data"], p["supernet"], p["table"], p["base"], out / "correlation")
    base = load_detector(p["base"])
    lat = ctx.latency(ctx.base_arch, ctx.base_head)
    options = candidate_actions(ctx.base_arch, ctx.base_head, ctx.base_head, ctx.bounds, ctx.table, lat, 0.0)
    from jdnas.joint.search import teacher_for
    gene = str(largest_gene(ctx.space))
    teacher, _ = teacher_for(ctx, gene, Spent())
    rows = []
    with ctx.screen() as screen:
        for x in screen.actions(base, [a for a in options if a.kind in CUT_KINDS]):
            d = ctx.root / str(x["action"]).replace("(", "_").replace(")", "").replace(",", "_")
            d.mkdir(parents=True, exist_ok=True)
            lin = apply_moves(Lineage(load_detector(p["base"]), 0, gene), [x["action"]])
            lin = _train(ctx, lin, teacher, ctx.cfg["cut_trial_iters"], 0, d, Spent(), "training", p["base"])
            rows.append({"action": str(x["action"]), "screen_ap": x["ap"],
                         "trained_ap": _evaluate(ctx, lin.model, None, Spent())["AP"]})
    df = pd.DataFrame(rows)
    print(table([[r.action, f"{r.screen_ap:.2f}", f"{r.trained_ap:.2f}"] for r in df.itertuples()],
                ["cut of the base", "screen AP", f"minival AP after {ctx.cfg['cut_trial_iters']} it"]))
    rho = float(df["screen_ap"].rank().corr(df["trained_ap"].rank()))
    print(f"\nSpearman(screen AP, trained AP) over {len(df)} cuts: {rho:.3f}")
    return {"spearman": rho, "cuts": len(df)}


def seed_spread(run: Path, out: Path, seeds: int, jobs: int, variants: list[str]) -> None:
    """Mean and sd of val AP over search seeds, for each search variant and prune_kd matched to
    each of its seeds."""
    import statistics
    names = [f"{v} seed={s}" for v in variants for s in range(seeds)]
    with ProcessPoolExecutor(jobs) as pool:
        joint = [f.result() for f in [pool.submit(run_variant, str(run), str(out), n, int(n.split("=")[-1]))
                                      for n in names]]
        pk = [f.result() for f in [pool.submit(run_prune_kd, str(run), str(out), j["summary"],
                                               int(j["name"].split("=")[-1]), _matched_name(j["name"]))
                                   for j in joint]]
    rows = joint + pk
    measure(rows, run)
    print(table([[r["name"], f"{r['ap']:.2f}", f"{r['measured_ratio']:.3f}", f"{r['predicted_ratio']:.3f}",
                  str(r["meets_target"]).lower(), f"{r['compute']:.0f} {r['unit']}"] for r in rows],
                ["run", "val AP", "measured latency ratio", "predicted ratio", "meets target", "compute"]))
    for v in variants:
        for label, group in ((v, joint), (f"prune_kd vs {v}", pk)):
            aps = [r["ap"] for r, n in zip(group, names) if n.startswith(f"{v} seed=")]
            sd = statistics.stdev(aps) if len(aps) > 1 else 0.0
            print(f"{label}: val AP {statistics.mean(aps):.2f} ± {sd:.2f} over {len(aps)} seeds")


def _matched_name(name: str) -> str:
    """prune_kd's row matched to the search row `name` ("full seed=0" -> "prune_kd seed=0")."""
    variant, seed = name.split(" seed=")
    return f"prune_kd seed={seed}" if variant == "full" else f"prune_kd vs {variant} seed={seed}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=REPO, help="a finished run's folder (params.yaml, data/, runs/)")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "ablation")
    ap.add_argument("--jobs", type=int, default=2, help="variants run at once (one core each)")
    ap.add_argument("--params", type=Path, action="append", default=[],
                    help="params files for the searches (default: the run's params.yaml)")
    ap.add_argument("--only", action="append", default=[], help="run only these variants (names as in the table)")
    ap.add_argument("--correlation", action="store_true", help="also measure the screen's rank correlation")
    ap.add_argument("--matched", action="store_true",
                    help="prune_kd matched to every variant's compute (default: to the full search's only)")
    ap.add_argument("--seeds", type=int, default=0,
                    help="instead of the ablation: each variant (--only, default full) and prune_kd matched "
                         "to it over this many search seeds")
    args = ap.parse_args()
    run, out = args.run.resolve(), args.out.resolve()
    PARAMS.extend(p.resolve() for p in args.params)
    unknown = [v for v in args.only if v not in VARIANTS]
    if unknown:
        ap.error(f"--only {unknown[0]!r}: not a variant (one of: {', '.join(VARIANTS)})")
    if args.seeds:
        return seed_spread(run, out, args.seeds, args.jobs, args.only or ["full"])
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_variant, str(run), str(out), name) for name in VARIANTS
                   if not args.only or name in args.only]
        rows = [f.result() for f in futures]
        if args.matched:
            rows += [f.result() for f in [pool.submit(run_prune_kd, str(run), str(out), r["summary"], None,
                                                      f"prune_kd vs {r['name']}") for r in list(rows)]]
        else:
            full = next(r for r in rows if r["name"] == "full")
            rows.append(pool.submit(run_prune_kd, str(run), str(out), full["summary"]).result())
    measure(rows, run)
    print(table([[r["name"], f"{r['ap']:.2f}", f"{r['measured_ratio']:.3f}", f"{r['predicted_ratio']:.3f}",
                  str(r["meets_target"]).lower(), f"{r['compute']:.0f} {r['unit']}"] for r in rows],
                ["variant", "val AP", "measured latency ratio", "predicted ratio", "meets target", "compute"]))
    if args.correlation:
        print()
        screen_correlation(run, out)


if __name__ == "__main__":
    main()
