"""The final evaluation (stage evaluate_final): the search's student and the base detector on val,
with measured latency (eager and onnxruntime, interleaved), predicted latency per part, params
and FLOPs, and whether the student meets the target."""
from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from jdnas.config import val_timing
from jdnas.engine.device import resolve_device
from jdnas.engine.loop import evaluate
from jdnas.io import write_json
from jdnas.joint.rounds import load_state
from jdnas.latency import LatencyTable
from jdnas.latency.measure import compare_on_val, latency_images
from jdnas.models.arch import Head
from jdnas.models.complexity import count_flops, count_params
from jdnas.models.detector import load_detector, save_detector
from jdnas.models.export import OnnxDetector, export_onnx


def deployment_latency(models: dict[str, Any], data_dir: Path, out_dir: Path, max_size: int,
                       timing: dict[str, Any]) -> dict[str, dict]:
    """The models exported to ONNX (out_dir/model.onnx for the final student; the base's in a
    temporary folder), checked against PyTorch on the val images latency is timed on, then timed
    under onnxruntime on the CPU in one interleaved measurement (`timing`: `config.val_timing`):
    the latency they ship with."""
    images = latency_images(data_dir / "val.json", max_size)
    threads = timing["threads"]
    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: out_dir / "model.onnx" if name == "final" else Path(tmp) / f"{name}.onnx" for name in models}
        checks = {name: export_onnx(models[name].cpu(), paths[name], images) for name in models}
        latency = compare_on_val({name: OnnxDetector(p, threads) for name, p in paths.items()}, data_dir,
                                 torch.device("cpu"), max_size, **timing)
    for c in checks.values():
        c.pop("path")
    return {"latency": latency, "checks": checks}


def evaluate_final(params: dict, data_dir: str | Path, state_path: str | Path, base: str | Path,
                   out_dir: str | Path, latency_table: str | Path) -> dict[str, Any]:
    """The final student and the base detector on val: AP, measured latency, predicted latency per
    part (from the table), params, FLOPs; whether the final student meets the target (predicted and
    measured) and keeps the base's AP (`meets_ap`: within `search.ap_tolerance`), and how far the
    table's predictions are from this run's interleaved timings."""
    device = resolve_device(params["device"])
    state = asdict(load_state(Path(state_path)))
    state["meets_target"] = state["latency_ms"] <= state["target_ms"]
    models = {"final": load_detector(Path(state_path).parent / "student.pt", device),
              "base": load_detector(base, device)}
    round0 = asdict(load_state(Path(state_path).parent.parent / "round_0" / "state.json"))
    table = LatencyTable.load(latency_table)
    # both timed in the same interleaved rounds: what differs between them is the models
    max_size = models["base"].head_cfg["max_size"]
    timing = val_timing(params)
    latency = compare_on_val(models, data_dir, device, max_size, **timing)
    deployed = deployment_latency(models, Path(data_dir), Path(out_dir), max_size, timing)
    summary: dict[str, Any] = {}
    for name, model in models.items():
        m = evaluate(model, Path(data_dir) / "val.json", params["eval"]["batch_size"], device)
        m.update({"arch": str(model.arch), "head": str(Head.of(model.head_cfg)), "params": count_params(model),
                  "flops": count_flops(model), "latency_ms": latency[name],
                  "latency_onnxruntime_ms": deployed["latency"][name], "onnx_check": deployed["checks"][name],
                  "predicted_latency_ms": state["latency_ms"] if name == "final" else round0["latency_ms"],
                  "predicted_breakdown_ms": {k: round(v, 4) for k, v in
                                             table.breakdown(model.arch, Head.of(model.head_cfg)).items()}})
        summary[name] = m
    f, b = summary["final"], summary["base"]
    measured_ratio = latency["final"] / latency["base"]
    predicted_ratio = state["latency_ms"] / round0["latency_ms"]
    f.update({"ap_delta_vs_base": round(f["AP"] - b["AP"], 3),
              "meets_ap": bool(f["AP"] >= b["AP"] - params["search"]["ap_tolerance"]),
              "latency_target": params["search"]["latency_target"],
              "measured_meets_target": bool(measured_ratio <= params["search"]["latency_target"]),
              # the table against this run's own interleaved timings: how far predictions may be trusted
              "latency_table_error": {name: round(summary[name]["predicted_latency_ms"] / latency[name] - 1, 4)
                                      for name in ("base", "final")},
              "ratio_error": round(predicted_ratio / measured_ratio - 1, 4)})
    summary["final"].update({"target_ms": state["target_ms"], "meets_target": state["meets_target"],
                             "latency_ratio": round(measured_ratio, 4),
                             "latency_ratio_onnxruntime": round(deployed["latency"]["final"]
                                                                / deployed["latency"]["base"], 4),
                             "predicted_latency_ratio": round(predicted_ratio, 4)})
    save_detector(Path(out_dir) / "model.pt", models["final"].cpu(), stage="evaluate_final", metrics=summary["final"],
                  teacher=state["teacher"], search_round=state["round"])
    write_json(Path(out_dir) / "metrics.json", summary)
    return summary


def final_line(summary: dict) -> str:
    """evaluate_final's one line: the latency check and the AP check, each named plainly."""
    f, b = summary["final"], summary["base"]
    ap = (f"AP {f['AP']:.2f} vs the base's {b['AP']:.2f} ({f['ap_delta_vs_base']:+.2f}): "
          + ("keeps the base's accuracy" if f["meets_ap"] else "LESS ACCURATE THAN THE BASE"))
    target = f"the {f['latency_target']:g}x target"
    if f["meets_target"] and f["measured_meets_target"]:
        verdict = f"meets {target} (predicted and measured)"
    elif f["meets_target"]:
        verdict = f"meets {target} as predicted, NOT AS MEASURED"
    else:
        verdict = (f"MISSES THE {f['latency_target']:g}x TARGET"
                   + (" as predicted (measured: meets it)" if f["measured_meets_target"] else ""))
    lat = (f"latency {f['latency_ratio']:.3f}x the base's measured, {f['predicted_latency_ratio']:.3f}x predicted "
           f"(table error {100 * f['ratio_error']:+.1f}%): {verdict}")
    return f"evaluate_final: final student: {lat}; {ap}"
