"""Dataset importers on tiny folders written here in the real formats."""

from __future__ import annotations

import json

import pytest
from django.core.management import CommandError, call_command

from evaluation import datasets
from evaluation.datasets import DatasetError
from search.models import Caption, ImageAsset
from tests.helpers import picture, write_karpathy

pytestmark = pytest.mark.django_db









def captions_for(i: int, n: int = 5) -> list[str]:
    things = ["dog", "cat", "bicycle", "boat", "kite", "horse", "train", "pizza", "clock", "tree"]
    return [f"a photo number {j} of a {things[i % len(things)]} seen from view {i}" for j in range(n)]


@pytest.fixture
def flickr(tmp_path):
    entries = [("train", captions_for(0)), ("test", captions_for(1)), ("val", captions_for(2)),
               ("test", captions_for(3)), ("test", captions_for(4))]
    return write_karpathy(tmp_path / "flickr30k", entries)


def collection_state(name):
    assets = ImageAsset.objects.filter(collection=name)
    return assets.count(), Caption.objects.filter(asset__in=assets).count()


def test_flickr30k_test_split_becomes_assets_with_their_captions_in_a_collection(flickr):
    dataset = datasets.load("auto", flickr.parent)
    assert dataset.kind == "flickr30k" and dataset.split == "test"
    assert [item.relative_name for item in dataset.items] == ["img_0001.jpg", "img_0003.jpg", "img_0004.jpg"]

    result = datasets.import_dataset(dataset)

    assert result.collection == "flickr30k-test"
    assert (result.created, result.existing, result.new_captions) == (3, 0, 15)
    assert collection_state("flickr30k-test") == (3, 15)
    asset = ImageAsset.objects.get(pk=result.asset_ids[0])
    assert asset.original_name == "img_0001.jpg"
    assert sorted(asset.captions.values_list("text", flat=True)) == sorted(captions_for(1))


def test_reimporting_a_dataset_adds_nothing(flickr):
    first = datasets.import_dataset(datasets.load("flickr30k", flickr))
    again = datasets.import_dataset(datasets.load("flickr30k", flickr))
    assert (again.created, again.existing, again.new_captions) == (0, 3, 0)
    assert again.asset_ids == first.asset_ids
    assert collection_state("flickr30k-test") == (3, 15)
    assert ImageAsset.objects.count() == 3


def test_limit_takes_the_first_images_of_the_split_and_progress_is_reported(flickr):
    seen = []
    result = datasets.import_dataset(datasets.load("flickr30k", flickr, limit=2), "quick",
                                     progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 2), (2, 2)]
    assert collection_state("quick") == (2, 10)
    assert result.collection == "quick"


def test_coco_karpathy_entries_are_found_through_their_filepath(tmp_path):
    entries = [("train", captions_for(0)), ("test", captions_for(1, 7)), ("restval", captions_for(2)),
               ("test", captions_for(3))]
    path = write_karpathy(tmp_path / "coco", entries, dataset="coco", json_name="dataset_coco.json",
                          filepath=lambda split: "train2014" if split == "train" else "val2014")
    dataset = datasets.load("auto", path)
    assert dataset.kind == "coco"
    assert [item.relative_name for item in dataset.items] == ["val2014/img_0001.jpg", "val2014/img_0003.jpg"]
    # The usual 5K protocol: five captions per image even where COCO has more.
    assert [len(item.captions) for item in dataset.items] == [5, 5]

    result = datasets.import_dataset(dataset)
    assert collection_state("coco-test") == (2, 10)
    assert result.created == 2
    everything = datasets.load("coco", path, split="restval", captions_per_image=None)
    assert len(everything.items) == 1


def test_coco_2017_caption_annotations_are_imported(tmp_path):
    root = tmp_path / "coco2017"
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    images, annotations = [], []
    for i, image_id in enumerate((139, 285, 632)):
        name = f"{image_id:012d}.jpg"
        (root / "val2017" / name).write_bytes(picture(i))
        images.append({"id": image_id, "file_name": name, "width": 40, "height": 32})
    for n, (image_id, text) in enumerate([(285, "a big brown bear"), (139, "a living room with a tv"),
                                          (285, "a bear sitting in the grass"), (632, "a bedroom with a bed"),
                                          (139, "a room with chairs and a fireplace")]):
        annotations.append({"id": 1000 + n, "image_id": image_id, "caption": text})
    (root / "annotations" / "captions_val2017.json").write_text(
        json.dumps({"info": {}, "images": images, "annotations": annotations}))

    dataset = datasets.load("auto", root)
    assert (dataset.kind, dataset.split) == ("coco2017", "val2017")
    assert [item.captions for item in dataset.items] == [
        ["a living room with a tv", "a room with chairs and a fireplace"],
        ["a big brown bear", "a bear sitting in the grass"],
        ["a bedroom with a bed"],
    ]
    datasets.import_dataset(dataset)
    assert collection_state("coco2017-val2017") == (3, 5)
    with pytest.raises(DatasetError, match="only the 'val2017' split"):
        datasets.load("coco2017", root, split="test")


def test_the_generated_shapes_set_is_imported(tmp_path):
    from embeddings.core.synthetic import generate

    generate(tmp_path / "shapes", n_train=0, n_val=1, n_test=3, image_size=32)
    dataset = datasets.load("auto", tmp_path / "shapes")
    assert (dataset.kind, dataset.split, len(dataset.items)) == ("synthetic", "test", 3)
    datasets.import_dataset(dataset)
    assert collection_state("synthetic-test") == (3, 15)


def test_a_missing_image_file_is_named_with_its_entry(flickr):
    (flickr.parent / "flickr30k-images" / "img_0003.jpg").unlink()
    with pytest.raises(DatasetError) as error:
        datasets.load("flickr30k", flickr)
    message = str(error.value)
    assert str(flickr) in message and "images[3] (img_0003.jpg)" in message and "not found" in message
    assert not ImageAsset.objects.exists()


def test_malformed_json_is_reported_with_the_file_and_position(tmp_path):
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text('{"dataset": "flickr30k", "images": [{"filename": "a.jpg",}]}')
    with pytest.raises(DatasetError) as error:
        datasets.load("auto", path)
    assert str(path) in str(error.value) and "not valid JSON" in str(error.value)
    assert "line 1" in str(error.value)


def test_an_entry_without_captions_is_named(tmp_path):
    path = write_karpathy(tmp_path / "f", [("test", captions_for(0)), ("test", captions_for(1))])
    data = json.loads(path.read_text())
    data["images"][1]["sentences"] = []
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"images\[1\] \(img_0001.jpg\) has no 'sentences'"):
        datasets.load("flickr30k", path)


def test_an_unknown_split_lists_the_splits_there_are(flickr):
    with pytest.raises(DatasetError, match=r"no images in the split 'dev'.*test \(3\)"):
        datasets.load("flickr30k", flickr, split="dev")


def test_image_paths_may_not_leave_the_image_folder(tmp_path):
    path = write_karpathy(tmp_path / "f", [("test", captions_for(0))])
    data = json.loads(path.read_text())
    data["images"][0]["filename"] = "../../etc/passwd"
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="must stay inside the image folder"):
        datasets.load("flickr30k", path)


def test_a_file_that_is_not_a_readable_image_is_named(flickr):
    (flickr.parent / "flickr30k-images" / "img_0004.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match=r"images\[4\] \(img_0004.jpg\).*not a readable image"):
        datasets.import_dataset(datasets.load("flickr30k", flickr))


def test_a_path_that_does_not_exist_or_the_wrong_kind_is_refused(tmp_path, flickr):
    with pytest.raises(DatasetError, match="no such file or folder"):
        datasets.load("auto", tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="is a 'flickr30k' dataset file, not 'coco'"):
        datasets.load("coco", flickr)
    with pytest.raises(DatasetError, match="holds no dataset file"):
        datasets.load("coco", flickr.parent)


def test_import_command_imports_and_turns_errors_into_command_errors(flickr, capsys):
    call_command("import_dataset", str(flickr), "--limit", "2", "--no-embed")
    out = capsys.readouterr().out
    assert "flickr30k test: 2 images" in out and "2 images added" in out
    assert collection_state("flickr30k-test") == (2, 10)
    call_command("import_dataset", str(flickr.parent), "--collection", "flickr-all", "--no-embed")
    assert collection_state("flickr-all") == (1, 5)  # the first two stay in the collection they came with
    capsys.readouterr()
    call_command("import_dataset", str(flickr), "--limit", "2")  # nothing new: nothing is queued
    out = capsys.readouterr().out
    assert "0 images added, 2 already present, 0 new captions." in out and "queued" not in out

    (flickr.parent / "flickr30k-images" / "img_0001.jpg").unlink()
    with pytest.raises(CommandError, match=r"images\[1\] \(img_0001.jpg\)"):
        call_command("import_dataset", str(flickr))
