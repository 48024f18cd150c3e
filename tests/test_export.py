"""ONNX export: onnxruntime gives PyTorch's detections, at any image size; bad checkpoints are one line."""
import subprocess
import sys

import pytest
import torch

from jdnas.data.dataset import CocoDetection
from jdnas.errors import JdnasError
from jdnas.models.detector import load_detector
from jdnas.models.export import OnnxDetector, compare, export_checkpoint, export_onnx


@pytest.fixture(scope="module")
def trained(base_ckpt):
    """The smoke base with a low score threshold, so that every image has detections to compare."""
    model = load_detector(base_ckpt)
    model.roi_heads.score_thresh = 0.0
    return model


def test_onnxruntime_matches_pytorch_on_val_images(trained, prepared, tmp_path):
    val = CocoDetection(prepared / "val.json", max_size=trained.head_cfg["max_size"])
    images = [val[i][0] for i in range(len(val))]
    check = export_onnx(trained, tmp_path / "m.onnx", images)
    assert check["same_detections"], check
    assert check["max_box_diff_px"] < 1e-2 and check["max_score_diff"] < 1e-3, check
    # the image size is dynamic: another size, and a non-square one, run and agree too
    other = [torch.nn.functional.interpolate(images[0][None], size=(48, 80))[0]]
    assert compare(trained, OnnxDetector(tmp_path / "m.onnx"), other)["same_detections"]
    assert len(OnnxDetector(tmp_path / "m.onnx")(images)[0]["boxes"]) > 0


def test_export_cli_and_bad_checkpoints(base_ckpt, tmp_path):
    out = tmp_path / "m.onnx"
    run = subprocess.run([sys.executable, "-m", "jdnas.cli", "export", str(base_ckpt), "--out", str(out)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert out.is_file() and '"same_detections": true' in run.stdout
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(JdnasError, match="junk.pt: not a readable checkpoint"):
        export_checkpoint(tmp_path / "junk.pt", tmp_path / "junk.onnx")
    assert not (tmp_path / "junk.onnx").exists()
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(JdnasError, match="junk.onnx: not a loadable ONNX model"):
        OnnxDetector(tmp_path / "junk.onnx")
