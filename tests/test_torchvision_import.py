"""Import of torchvision-trained Faster R-CNN ResNet-FPN detectors: same outputs, clear errors."""
import pytest
import torch
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

from jdnas.cli import main
from jdnas.models.detector import load_detector
from jdnas.models.torchvision_import import import_torchvision
from conftest import REPO

SIZE = {"min_size": 160, "max_size": 192}
# torchvision's defaults for what jdnas takes from params
HEAD = {**SIZE, "anchor_sizes": [32, 64, 128, 256, 512], "rpn_pre_nms_top_n_train": 2000,
        "rpn_post_nms_top_n_train": 2000, "rpn_pre_nms_top_n_test": 1000, "rpn_post_nms_top_n_test": 1000,
        "rpn_batch_size_per_image": 256, "box_batch_size_per_image": 512, "box_detections_per_img": 20,
        "box_score_thresh": 0.0, "fpn_channels": 0, "representation_size": 0}


def torchvision_detector(depth: str, classes: int = 4) -> FasterRCNN:
    """A randomly initialised torchvision Faster R-CNN, frozen-BN statistics randomised too."""
    torch.manual_seed(0)
    model = FasterRCNN(resnet_fpn_backbone(backbone_name=depth, weights=None, trainable_layers=5), num_classes=classes,
                       box_detections_per_img=20, box_score_thresh=0.0, **SIZE).eval()
    for name, b in model.named_buffers():
        if "running_var" in name:
            b.uniform_(1.0, 2.0)
        elif "running_mean" in name or name.endswith(".bias"):
            b.normal_(0.0, 0.05)
        elif name.endswith(".weight"):  # shrinking residual branches keeps a random 101-layer net finite
            b.uniform_(0.2, 0.5)
    return model


@pytest.mark.parametrize("depth, arch", [
    ("resnet18", "S64:2x64m64-2x128m128-2x256m256-2x512m512"),
    ("resnet34", "S64:3x64m64-4x128m128-6x256m256-3x512m512"),
    ("resnet50", "B64:3x256m64-4x512m128-6x1024m256-3x2048m512"),
    ("resnet101", "B64:3x256m64-4x512m128-23x1024m256-3x2048m512"),
])
def test_imported_detector_gives_torchvisions_outputs(tmp_path, depth, arch):
    tv = torchvision_detector(depth)
    torch.save(tv.state_dict(), tmp_path / "tv.pt")
    info = import_torchvision(tmp_path / "tv.pt", tmp_path / "jd.pt", HEAD)
    assert info["arch"] == arch and info["classes"] == 3 and info["fpn_channels"] == 256
    jd = load_detector(tmp_path / "jd.pt")
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 150, 190, generator=g), torch.rand(3, 170, 130, generator=g)]
    with torch.no_grad():
        expected, got = tv(images), jd(images)
    for e, o in zip(expected, got):
        assert len(e["boxes"]) > 0 and torch.equal(e["labels"], o["labels"])
        assert (e["scores"] - o["scores"]).abs().max() < 1e-4
        assert (e["boxes"] - o["boxes"]).abs().max() < 1e-4  # pixels (measured: <= 1.6e-5)


def test_bad_sources_are_one_line_errors_and_write_nothing(tmp_path, capsys):
    params = ["--params", str(REPO / "params.yaml")]
    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04 truncated")
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 512)}, tmp_path / "clf.pt")
    sd = torchvision_detector("resnet18").state_dict()
    torch.save({k: v for k, v in sd.items() if "fc7" not in k}, tmp_path / "missing.pt")
    torch.save({**sd, "roi_heads.extra.weight": torch.zeros(1)}, tmp_path / "extra.pt")
    for name, words in [("nope.pt", "nope.pt: file not found"), ("cut.pt", "cut.pt: not a readable state_dict"),
                        ("clf.pt", "clf.pt: backbone.body.conv1.weight: missing"),
                        ("missing.pt", "missing.pt: missing key roi_heads.box_head.fc7.bias"),
                        ("extra.pt", "extra.pt: unexpected key roi_heads.extra.weight")]:
        assert main(["import-torchvision", str(tmp_path / name), "--out", str(tmp_path / "out.pt"), *params]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
        assert not (tmp_path / "out.pt").exists()


def test_auto_model_settings_come_from_the_prepared_data(tmp_path, prepared, capsys):
    """With `auto` input size and anchors the import needs the data: --data resolves them."""
    torch.save(torchvision_detector("resnet18").state_dict(), tmp_path / "tv.pt")
    (tmp_path / "auto.yaml").write_text("model:\n  min_size: auto\n  max_size: auto\n  anchor_sizes: auto\n")
    params = ["--params", str(REPO / "params.yaml"), "--params", str(tmp_path / "auto.yaml")]
    assert main(["import-torchvision", str(tmp_path / "tv.pt"), "--out", str(tmp_path / "jd.pt"), *params]) == 2
    assert "pass --data data/prepared" in capsys.readouterr().err
    assert main(["import-torchvision", str(tmp_path / "tv.pt"), "--out", str(tmp_path / "jd.pt"), *params,
                 "--data", str(prepared)]) == 0
    from jdnas.data.prepare import resolved_params
    from jdnas.config import load_params
    want = resolved_params(load_params([REPO / "params.yaml", tmp_path / "auto.yaml"]), prepared)["model"]
    head = load_detector(tmp_path / "jd.pt").head_cfg
    assert (head["min_size"], head["max_size"], head["anchor_sizes"]) == (
        want["min_size"], want["max_size"], want["anchor_sizes"])
