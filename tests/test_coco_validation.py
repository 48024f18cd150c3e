"""Every kind of bad user data fails with one line naming the file and the offending id/field,
exits non-zero from the CLI, and leaves no prepared output behind."""
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from jdnas.data.coco import load_coco
from jdnas.errors import DataError
from conftest import REPO, cli_env, write_yaml


def _good(tmp: Path) -> dict:
    (tmp / "img").mkdir(exist_ok=True)
    for i in (1, 2):
        Image.new("RGB", (40, 30), (i * 50, 0, 0)).save(tmp / "img" / f"{i}.png")
    return {
        "images": [{"id": 1, "file_name": "1.png", "width": 40, "height": 30},
                   {"id": 2, "file_name": "2.png", "width": 40, "height": 30}],
        "annotations": [{"id": 10, "image_id": 1, "category_id": 7, "bbox": [1, 2, 10, 10], "area": 100, "iscrowd": 0},
                        {"id": 11, "image_id": 2, "category_id": 9, "bbox": [5, 5, 20, 20], "area": 400, "iscrowd": 0}],
        "categories": [{"id": 7, "name": "cat"}, {"id": 9, "name": "dog"}],
    }


def _write(tmp: Path, data) -> Path:
    p = tmp / "ann.json"
    p.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return p


def test_good_file_loads(tmp_path):
    data, clipped = load_coco(_write(tmp_path, _good(tmp_path)), tmp_path / "img")
    assert clipped == 0 and len(data["annotations"]) == 2


def _mutate(fn):
    def apply(d):
        d = copy.deepcopy(d)
        fn(d)
        return d
    return apply


CASES = {
    "missing key": (_mutate(lambda d: d.pop("categories")), "missing key 'categories'"),
    "image missing field": (_mutate(lambda d: d["images"][1].pop("width")), "images id=2: missing key 'width'"),
    "ann missing bbox": (_mutate(lambda d: d["annotations"][0].pop("bbox")), "annotations id=10: missing key 'bbox'"),
    "dangling image": (_mutate(lambda d: d["annotations"][1].update(image_id=99)), "annotations id=11: image_id 99 not in images"),
    "dangling category": (_mutate(lambda d: d["annotations"][0].update(category_id=3)), "annotations id=10: category_id 3 not in categories"),
    "zero width": (_mutate(lambda d: d["annotations"][0].update(bbox=[1, 1, 0, 5])), "annotations id=10: bbox width and height must be > 0"),
    "negative height": (_mutate(lambda d: d["annotations"][1].update(bbox=[1, 1, 5, -2])), "annotations id=11: bbox width and height must be > 0"),
    "wholly outside": (_mutate(lambda d: d["annotations"][0].update(bbox=[50, 40, 5, 5])), "lies wholly outside image 1 (40x30): rejected"),
    "bad bbox": (_mutate(lambda d: d["annotations"][0].update(bbox=[1, 2, 3])), "annotations id=10: bbox must be 4 finite numbers"),
    "nan in bbox": (_mutate(lambda d: d["annotations"][0].update(bbox=[1, 2, float("nan"), 10])), "annotations id=10: bbox must be 4 finite numbers"),
    "inf in bbox": (_mutate(lambda d: d["annotations"][1].update(bbox=[1, 2, 5, float("inf")])), "annotations id=11: bbox must be 4 finite numbers"),
    "image_id a list": (_mutate(lambda d: d["annotations"][0].update(image_id=[1])), "annotations id=10: image_id must be an integer"),
    "category_id a list": (_mutate(lambda d: d["annotations"][0].update(category_id=[7])), "annotations id=10: category_id must be an integer"),
    "area a word": (_mutate(lambda d: d["annotations"][1].update(area="big")), "annotations id=11: area must be a finite number"),
    "iscrowd a word": (_mutate(lambda d: d["annotations"][1].update(iscrowd="no")), "annotations id=11: iscrowd must be 0 or 1"),
    "category name a list": (_mutate(lambda d: d["categories"][0].update(name=["cat"])), "categories id=7: name must be a non-empty string"),
    "duplicate category name": (_mutate(lambda d: d["categories"][1].update(name="cat")), "categories id=9: name 'cat' is also category id=7"),
    "declared size disagrees": (_mutate(lambda d: d["images"][0].update(width=50)), "1.png is 40x30 but width/height say 50x30"),
    "duplicate image id": (_mutate(lambda d: d["images"][1].update(id=1)), "images: duplicate id 1"),
    "duplicate ann id": (_mutate(lambda d: d["annotations"][1].update(id=10)), "annotations: duplicate id 10"),
    "duplicate category id": (_mutate(lambda d: d["categories"][1].update(id=7)), "categories: duplicate id 7"),
    "empty images": (_mutate(lambda d: d.update(images=[], annotations=[])), "empty dataset (no images)"),
    "empty annotations": (_mutate(lambda d: d.update(annotations=[])), "empty dataset (no annotations)"),
    "missing image file": (_mutate(lambda d: d["images"][0].update(file_name="nope.png")), "images id=1: file_name 'nope.png' not found"),
    # the file's shape
    "top level a list": (lambda d: [d], "top level must be an object"),
    "images not a list": (_mutate(lambda d: d.update(images={"1": d["images"][0]})), "images: must be a list"),
    "annotation not an object": (_mutate(lambda d: d["annotations"].__setitem__(0, 5)), "annotations[0]: must be an object"),
    "category not an object": (_mutate(lambda d: d["categories"].__setitem__(1, "dog")), "categories[1]: must be an object"),
    "no images key": (_mutate(lambda d: d.pop("images")), "missing key 'images'"),
    "no annotations key": (_mutate(lambda d: d.pop("annotations")), "missing key 'annotations'"),
    "empty categories": (_mutate(lambda d: d.update(categories=[])), "categories: empty (no categories)"),
    # ids
    "record without id": (_mutate(lambda d: d["images"][0].pop("id")), "images [0]: missing key 'id'"),
    "image id a string": (_mutate(lambda d: d["images"][0].update(id="1")), "images[0]: id must be an integer, got '1'"),
    "image id a bool": (_mutate(lambda d: d["images"][0].update(id=True)), "images[0]: id must be an integer, got True"),
    "ann id a float": (_mutate(lambda d: d["annotations"][0].update(id=10.5)), "annotations[0]: id must be an integer"),
    "category id null": (_mutate(lambda d: d["categories"][0].update(id=None)), "categories[0]: id must be an integer"),
    "image_id a bool": (_mutate(lambda d: d["annotations"][0].update(image_id=True)), "annotations id=10: image_id must be an integer"),
    "category_id a string": (_mutate(lambda d: d["annotations"][1].update(category_id="9")), "annotations id=11: category_id must be an integer"),
    # image records
    "image missing file_name": (_mutate(lambda d: d["images"][0].pop("file_name")), "images id=1: missing key 'file_name'"),
    "width zero": (_mutate(lambda d: d["images"][0].update(width=0)), "images id=1: width must be a positive integer"),
    "height a float": (_mutate(lambda d: d["images"][1].update(height=30.0)), "images id=2: height must be a positive integer"),
    "width a string": (_mutate(lambda d: d["images"][0].update(width="40")), "images id=1: width must be a positive integer"),
    "file_name empty": (_mutate(lambda d: d["images"][0].update(file_name="")), "images id=1: file_name must be a non-empty string"),
    "file_name a number": (_mutate(lambda d: d["images"][1].update(file_name=2)), "images id=2: file_name must be a non-empty string"),
    # categories
    "category missing name": (_mutate(lambda d: d["categories"][0].pop("name")), "categories id=7: missing key 'name'"),
    "category name blank": (_mutate(lambda d: d["categories"][1].update(name="  ")), "categories id=9: name must be a non-empty string"),
    # annotation fields
    "ann missing category_id": (_mutate(lambda d: d["annotations"][0].pop("category_id")), "annotations id=10: missing key 'category_id'"),
    "area negative": (_mutate(lambda d: d["annotations"][0].update(area=-1)), "annotations id=10: area must be a finite number >= 0"),
    "area nan": (_mutate(lambda d: d["annotations"][0].update(area=float("nan"))), "annotations id=10: area must be a finite number"),
    "iscrowd 2": (_mutate(lambda d: d["annotations"][0].update(iscrowd=2)), "annotations id=10: iscrowd must be 0 or 1"),
    "iscrowd a bool": (_mutate(lambda d: d["annotations"][0].update(iscrowd=True)), "annotations id=10: iscrowd must be 0 or 1"),
    "bbox a string": (_mutate(lambda d: d["annotations"][0].update(bbox="1,2,3,4")), "annotations id=10: bbox must be 4 finite numbers"),
    "bbox null": (_mutate(lambda d: d["annotations"][1].update(bbox=None)), "annotations id=11: bbox must be 4 finite numbers"),
    "bbox with a bool": (_mutate(lambda d: d["annotations"][0].update(bbox=[True, 1, 5, 5])), "annotations id=10: bbox must be 4 finite numbers"),
    "bbox with a numeric string": (_mutate(lambda d: d["annotations"][0].update(bbox=["1", 2, 3, 4])), "annotations id=10: bbox must be 4 finite numbers"),
    "bbox of five": (_mutate(lambda d: d["annotations"][0].update(bbox=[1, 2, 3, 4, 5])), "annotations id=10: bbox must be 4 finite numbers"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_a_one_line_error(tmp_path, case):
    mutate, words = CASES[case]
    ann = _write(tmp_path, mutate(_good(tmp_path)))
    with pytest.raises(DataError) as e:
        load_coco(ann, tmp_path / "img")
    assert words in str(e.value)
    assert str(ann) in str(e.value) and "\n" not in str(e.value)


def test_invalid_json_names_position(tmp_path):
    _good(tmp_path)
    ann = _write(tmp_path, '{"images": [}')
    with pytest.raises(DataError, match=r"ann.json: invalid JSON: .* line 1 column"):
        load_coco(ann, tmp_path / "img")


def test_missing_annotation_file_and_image_folder(tmp_path):
    with pytest.raises(DataError, match="nope.json: file not found"):
        load_coco(tmp_path / "nope.json", tmp_path)
    ann = _write(tmp_path, _good(tmp_path))
    with pytest.raises(DataError, match="image folder not found"):
        load_coco(ann, tmp_path / "missing")


def test_unreadable_image(tmp_path):
    ann = _write(tmp_path, _good(tmp_path))
    (tmp_path / "img" / "2.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=r"images id=2: .*2.png cannot be read as an image"):
        load_coco(ann, tmp_path / "img")


def _bad_image(path: Path, kind: str) -> None:
    if kind == "truncated":
        Image.new("RGB", (40, 30), (9, 9, 9)).save(path.with_suffix(".jpg"), quality=90)
        path.write_bytes(path.with_suffix(".jpg").read_bytes()[:-200])
    elif kind == "16-bit":
        Image.new("I;16", (40, 30), 40000).save(path)
    else:  # a decompression bomb: a tiny file that decodes to far more pixels than PIL allows
        Image.new("1", (20000, 20000)).save(path)


@pytest.mark.parametrize("kind, words", [("truncated", "cannot be read as an image"),
                                         ("16-bit", "has pixel mode I;16"),
                                         ("bomb", "is 20000x20000 = 400,000,000 pixels, above data.max_image_pixels")])
def test_images_are_decoded_in_full_at_load(tmp_path, kind, words):
    ann = _write(tmp_path, _good(tmp_path))
    _bad_image(tmp_path / "img" / "2.png", kind)
    with pytest.raises(DataError, match=f"images id=2: .*2.png {words}") as e:
        load_coco(ann, tmp_path / "img")
    assert "\n" not in str(e.value)


def test_image_pixel_limit_is_a_param(tmp_path):
    """The limit is checked on the annotation's size and on the file's header, before decoding."""
    ann = _write(tmp_path, _good(tmp_path))
    load_coco(ann, tmp_path / "img", max_pixels=40 * 30)
    with pytest.raises(DataError, match=r"images id=\d+: .* is 40x30 = 1,200 pixels, above data.max_image_pixels = "
                                        r"1,199: too large"):
        load_coco(ann, tmp_path / "img", max_pixels=40 * 30 - 1)
    _bad_image(tmp_path / "img" / "2.png", "bomb")
    with pytest.raises(DataError, match="is 40x30 = 1,200 pixels"):  # the annotation's size is checked first
        load_coco(ann, tmp_path / "img", max_pixels=1000)


def test_box_partly_outside_is_clipped_or_rejected(tmp_path):
    d = _good(tmp_path)
    d["annotations"][1]["bbox"] = [30, 20, 20, 20]  # image is 40x30
    ann = _write(tmp_path, d)
    data, clipped = load_coco(ann, tmp_path / "img", out_of_image="clip")
    assert clipped == 1 and data["annotations"][1]["bbox"] == [30.0, 20.0, 10.0, 10.0]
    with pytest.raises(DataError, match=r"annotations id=11: bbox .* extends outside image 2 \(40x30\): rejected"):
        load_coco(ann, tmp_path / "img", out_of_image="reject")


def test_cli_bad_data_exits_nonzero_and_leaves_no_output(tmp_path):
    d = _good(tmp_path)
    d["annotations"][0]["category_id"] = 3
    ann = _write(tmp_path, d)
    good_ann = tmp_path / "val.json"
    good_ann.write_text(json.dumps(_good(tmp_path)))
    params = write_yaml(tmp_path / "coco.yaml", {"data": {"source": "coco", "coco": {
        "train_images": str(tmp_path / "img"), "train_annotations": str(ann),
        "val_images": str(tmp_path / "img"), "val_annotations": str(good_ann)}}})
    out = tmp_path / "prepared"
    r = subprocess.run([sys.executable, "-m", "jdnas.cli", "prepare-data", "--params", str(REPO / "params.yaml"),
                        "--params", str(params), "--out", str(out)], capture_output=True, text=True, env=cli_env())
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("jdnas: error: ") and "category_id 3 not in categories" in lines[-1]
    assert not out.exists() and not list(tmp_path.glob(".prepared*"))


def test_coco_source_prepares_splits(tmp_path, smoke_params):
    from conftest import with_overrides
    from jdnas.data.prepare import prepare_data
    d = _good(tmp_path)
    ann = _write(tmp_path, d)
    p = with_overrides(smoke_params, {"data": {"source": "coco", "minival_fraction": 0.5, "coco": {
        "train_images": str(tmp_path / "img"), "train_annotations": str(ann),
        "val_images": str(tmp_path / "img"), "val_annotations": str(ann)}}})
    manifest = prepare_data(p, tmp_path / "prep")
    assert manifest["splits"]["train"]["images"] == 1 and manifest["splits"]["minival"]["images"] == 1
    from jdnas.data.dataset import CocoDetection
    ds = CocoDetection(tmp_path / "prep" / "val.json")
    assert len(ds) == 2 and ds[0][1]["labels"].tolist() == [1]


@pytest.mark.parametrize("change, words", [
    (lambda d: (d["images"].pop(), d["annotations"].pop()), "ann.json: images: 1 training image(s)"),
    (lambda d: d["images"].append({"id": 3, "file_name": "1.png", "width": 40, "height": 30}), None),
])
def test_a_split_without_boxes_is_an_error_not_ap_zero(tmp_path, smoke_params, change, words):
    """One training image leaves no minival; a minival of images without boxes would score 0 AP."""
    from conftest import with_overrides
    from jdnas.data.prepare import prepare_data
    d = _good(tmp_path)
    change(d)
    ann = _write(tmp_path, d)
    # with 3 images and minival_fraction 0.34, seed 0 holds out one image: make it the one without boxes
    p = with_overrides(smoke_params, {"data": {"source": "coco", "minival_fraction": 0.34, "coco": {
        "train_images": str(tmp_path / "img"), "train_annotations": str(ann),
        "val_images": str(tmp_path / "img"), "val_annotations": str(ann)}}})
    if words is None:
        from jdnas.data.prepare import split_minival
        _, mini = split_minival(d, 0.34, p["seed"])
        assert [im["id"] for im in mini["images"]] == [3]  # the image without boxes
        words = "the minival split (1 images) has no boxes (raise data.minival_fraction)"
    with pytest.raises(DataError) as e:
        prepare_data(p, tmp_path / "prep")
    assert words in str(e.value)
    assert not (tmp_path / "prep").exists()
