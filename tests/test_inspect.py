"""Data inspection: stats, the model settings that fit the data (`auto`), and warnings."""
import json

import pytest

from jdnas.cli import main
from jdnas.config import load_params
from jdnas.data.inspect import check_fit, data_stats, resolve_auto, suggest_model
from jdnas.data.prepare import resolved_params
from conftest import REPO, with_overrides, write_yaml


def _coco(width: int, height: int, sizes: list[float], per_image: int, images: int = 10) -> dict:
    """`images` images of width x height, each with `per_image` square boxes cycling through `sizes`."""
    anns, k = [], 0
    for i in range(1, images + 1):
        for j in range(per_image):
            s = sizes[k % len(sizes)]
            anns.append({"id": k + 1, "image_id": i, "category_id": 1 + j % 3, "bbox": [1, 1, s, s]})
            k += 1
    return {"images": [{"id": i, "file_name": f"{i}.png", "width": width, "height": height} for i in range(1, images + 1)],
            "annotations": anns, "categories": [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]}


def test_large_images_keep_their_resolution_and_get_anchors_around_their_objects():
    stats = data_stats(_coco(600, 400, [20, 40, 80, 160], per_image=3))
    assert stats["short_side"]["median"] == 400 and stats["object_size"]["median"] == 40
    s = suggest_model(stats, 50)
    assert (s["min_size"], s["max_size"]) == (384, 608)  # 400 x 600, snapped to multiples of 32
    a = s["anchor_sizes"]
    assert a == [a[0] * 2 ** k for k in range(5)] and a[0] <= 20 and a[-1] >= 160


def test_coco_sized_images_are_scaled_down_like_coco():
    s = suggest_model(data_stats(_coco(1280, 960, [16, 64, 256], per_image=2)), 100)
    assert s["max_size"] <= 1344 and s["min_size"] == 800


def test_crowded_images_raise_detections_per_image_and_are_warned_about():
    stats = data_stats(_coco(128, 128, [12], per_image=61))
    s = suggest_model(stats, 50)
    assert s["box_detections_per_img"] == 70
    model = {"min_size": 128, "max_size": 128, "anchor_sizes": [16, 32, 64, 128, 256], "box_detections_per_img": 50}
    warnings = check_fit(stats, model, {"images": 4, "boxes": 43})
    assert any("a training image has 61 objects but model.box_detections_per_img is 50" in w for w in warnings)
    assert any("minival has 4 images and 43 boxes" in w for w in warnings)


def test_objects_shrunk_below_the_anchors_are_warned_about():
    stats = data_stats(_coco(600, 600, [12, 16], per_image=2))
    model = {"min_size": 128, "max_size": 128, "anchor_sizes": [16, 32, 64, 128, 256], "box_detections_per_img": 50}
    assert any("under 3 px after resizing" in w for w in check_fit(stats, model))
    fitted = resolve_auto({**model, "min_size": "auto", "max_size": "auto", "anchor_sizes": "auto"},
                          suggest_model(stats, 50))
    assert fitted["min_size"] == 608 and not check_fit(stats, fitted)


def test_auto_is_resolved_from_the_manifest(prepared, smoke_params, tmp_path):
    p = with_overrides(smoke_params, {"model": {"min_size": "auto", "max_size": "auto", "anchor_sizes": "auto"}})
    manifest = json.loads((prepared / "manifest.json").read_text())
    resolved = resolved_params(p, prepared)
    assert [resolved["model"][k] for k in ("min_size", "max_size", "anchor_sizes")] == \
        [manifest["suggested"][k] for k in ("min_size", "max_size", "anchor_sizes")]
    assert resolved_params(smoke_params, prepared) is smoke_params  # nothing to resolve
    image = smoke_params["data"]["synthetic"]["image_size"]
    assert manifest["suggested"]["min_size"] == image and manifest["stats"]["train"]["images"] > 0


def test_auto_params_validate_and_bad_words_do_not(tmp_path):
    ok = write_yaml(tmp_path / "ok.yaml", {"model": {"min_size": "auto", "max_size": 640, "anchor_sizes": "auto"}})
    assert load_params([REPO / "params.yaml", ok])["model"]["min_size"] == "auto"
    bad = write_yaml(tmp_path / "bad.yaml", {"model": {"anchor_sizes": "automatic"}})
    with pytest.raises(Exception, match="model.anchor_sizes = 'automatic' is not allowed: .* or auto"):
        load_params([REPO / "params.yaml", bad])


def test_inspect_data_prints_stats_snippet_and_warnings(prepared, capsys):
    assert main(["inspect-data", "--data", str(prepared), "--params", str(REPO / "params.yaml")]) == 0
    out = capsys.readouterr().out
    assert "object_size" in out and "model:\n  min_size:" in out and "anchor_sizes: [" in out
    assert "warning: minival has" in out  # the smoke data's minival is tiny
    assert "resize: inputs 128/128, 96/96 (min_size/max_size; the 5th-percentile object measures 16.8" in out
    assert main(["inspect-data", "--params", str(REPO / "params.yaml")]) == 2  # synthetic, nothing prepared


def test_inspect_data_lists_the_inputs_resize_can_reach(prepared, capsys, tmp_path):
    any_size = tmp_path / "any.yaml"
    any_size.write_text("search_space: {resize_min_object: 0}\n")
    assert main(["inspect-data", "--data", str(prepared), "--params", str(REPO / "params.yaml"),
                 "--params", str(any_size)]) == 0
    assert "resize: inputs 128/128, 96/96, 64/64 (min_size/max_size;" in capsys.readouterr().out
    any_size.write_text("search_space: {resize_min_object: 16}\n")  # 16.8 px at 128: 12.6 at 96
    assert main(["inspect-data", "--data", str(prepared), "--params", str(REPO / "params.yaml"),
                 "--params", str(any_size)]) == 0
    assert "resize: no smaller input on these data (the 5th-percentile object" in capsys.readouterr().out


def test_auto_anchors_follow_a_fixed_input_size_and_detections_count_val_too():
    """600-px images run at a fixed 224 px: `auto` anchors are fitted at 224, not at 608; and a val
    image with more objects than any training image raises box_detections_per_img."""
    stats = data_stats(_coco(600, 600, [40, 80, 120], per_image=3))
    at_608 = suggest_model(stats, 50)["anchor_sizes"]
    at_224 = suggest_model(stats, 50, (224, 224))["anchor_sizes"]
    assert at_224[0] < at_608[0]
    val = data_stats(_coco(600, 600, [40], per_image=61, images=2))
    assert suggest_model(stats, 50, val=val)["box_detections_per_img"] == 70
    model = {"min_size": 224, "max_size": 224, "anchor_sizes": at_224, "box_detections_per_img": 50}
    assert any("a val image has 61 objects" in w for w in check_fit(stats, model, val=val))


def test_a_from_scratch_base_on_too_few_images_points_to_an_import():
    stats = data_stats(_coco(128, 128, [20, 40], per_image=2, images=20))
    model = {"min_size": 128, "max_size": 128, "anchor_sizes": [16, 32, 64, 128, 256], "box_detections_per_img": 50}
    assert any("only 20 training images" in w and "import-torchvision" in w
               for w in check_fit(stats, model, from_scratch=True))
    assert not any("training images" in w for w in check_fit(stats, model, from_scratch=False))
