"""The generated shapes data set: deterministic, Karpathy format, held-out test compositions."""

import json
from pathlib import Path

import pytest
from PIL import Image

from embeddings.core import synthetic

SMALL = {"n_train": 60, "n_val": 12, "n_test": 30, "image_size": 32}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    return synthetic.generate(out, seed=3, **SMALL)


def _load(json_path):
    return json.loads(Path(json_path).read_text())


def _folder_bytes(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _key(entry):
    c = entry["composition"]
    return (c["colour"], c["shape"], c["size"], c["position"], c["background"])


def test_same_seed_gives_identical_files(small_set, tmp_path):
    again = synthetic.generate(tmp_path / "again", seed=3, **SMALL)
    assert _folder_bytes(small_set.parent) == _folder_bytes(again.parent)


def test_different_seed_gives_different_captions_and_images(small_set, tmp_path):
    other = synthetic.generate(tmp_path / "other", seed=4, **SMALL)
    a, b = _load(small_set), _load(other)
    assert [e["sentences"] for e in a["images"]] != [e["sentences"] for e in b["images"]]
    assert _folder_bytes(small_set.parent / "images") != _folder_bytes(other.parent / "images")


def test_rerunning_into_the_same_folder_keeps_the_files_identical(tmp_path):
    first = synthetic.generate(tmp_path, seed=1, **SMALL)
    before = _folder_bytes(tmp_path)
    second = synthetic.generate(tmp_path, seed=1, **SMALL)
    assert second == first
    assert _folder_bytes(tmp_path) == before
    # a damaged set is rewritten, byte for byte the same
    (tmp_path / "images" / "test_00000.png").unlink()
    synthetic.generate(tmp_path, seed=1, **SMALL)
    assert _folder_bytes(tmp_path) == before


def test_json_is_in_karpathy_split_format(small_set):
    data = _load(small_set)
    assert data["dataset"] == "synthetic"
    images = data["images"]
    assert len(images) == SMALL["n_train"] + SMALL["n_val"] + SMALL["n_test"]
    counts = {s: sum(e["split"] == s for e in images) for s in ("train", "val", "test")}
    assert counts == {"train": SMALL["n_train"], "val": SMALL["n_val"], "test": SMALL["n_test"]}
    assert [e["imgid"] for e in images] == list(range(len(images)))
    all_sentids = []
    for entry in images:
        assert set(entry) >= {"filename", "filepath", "split", "sentences", "imgid", "sentids"}
        assert len(entry["sentences"]) == 5
        assert entry["sentids"] == [s["sentid"] for s in entry["sentences"]]
        for sentence in entry["sentences"]:
            assert isinstance(sentence["raw"], str) and sentence["raw"]
            assert sentence["tokens"] == synthetic.tokenize_caption(sentence["raw"])
            assert sentence["imgid"] == entry["imgid"]
        all_sentids += entry["sentids"]
        image_path = small_set.parent / entry["filepath"] / entry["filename"]
        with Image.open(image_path) as image:
            assert image.size == (SMALL["image_size"], SMALL["image_size"])
            assert image.mode == "RGB"
    assert all_sentids == list(range(len(all_sentids)))


def test_test_and_val_compositions_never_occur_in_training(small_set):
    images = _load(small_set)["images"]
    train = {_key(e) for e in images if e["split"] == "train"}
    val = [_key(e) for e in images if e["split"] == "val"]
    test = [_key(e) for e in images if e["split"] == "test"]
    assert not train & set(test)
    assert not train & set(val)
    assert not set(val) & set(test)


def test_each_test_and_val_image_is_a_unique_composition(small_set):
    images = _load(small_set)["images"]
    for split in ("val", "test"):
        keys = [_key(e) for e in images if e["split"] == split]
        assert len(keys) == len(set(keys))


def test_default_test_gallery_holds_at_least_500_unique_unseen_compositions():
    items = synthetic.plan(seed=0)
    test = [i.composition for i in items if i.split == "test"]
    train = {i.composition for i in items if i.split == "train"}
    assert len(test) >= 500
    assert len(set(test)) == len(test)
    assert not train & set(test)
    # every single attribute value is still seen in training
    for attribute in ("colour", "shape", "size", "position", "background"):
        assert {getattr(c, attribute) for c in train} == {getattr(c, attribute) for c in test}


def test_test_captions_name_every_attribute(small_set):
    def mentions(text, words):
        return any(w in text for w in words)

    for entry in _load(small_set)["images"]:
        if entry["split"] != "test":
            continue
        c = entry["composition"]
        for sentence in entry["sentences"]:
            text = sentence["raw"].lower()
            assert c["colour"] in text
            assert mentions(text, synthetic._SHAPE_WORDS[c["shape"]])
            assert mentions(text, synthetic._SIZE_WORDS[c["size"]])
            assert mentions(text, synthetic._POSITION_WORDS[c["position"]])
            assert c["background"] in text


def test_captions_of_an_image_are_varied():
    composition = synthetic.Composition("red", "circle", "small", "left", "white")
    captions = synthetic.captions_for(composition, seed="x")
    assert len(captions) == 5 == len(set(captions))


def test_render_draws_the_object_in_its_colour_and_place():
    composition = synthetic.Composition("red", "square", "large", "left", "white")
    image = synthetic.render(composition, image_size=64, seed=7)
    assert image.size == (64, 64)
    assert image.tobytes() == synthetic.render(composition, image_size=64, seed=7).tobytes()
    r, g, b = image.getpixel((int(64 * 0.3), 32))  # inside the object
    assert r > 150 and g < 90 and b < 90
    r, g, b = image.getpixel((int(64 * 0.9), 32))  # background on the right
    assert min(r, g, b) > 200


def test_command_line_writes_the_set(tmp_path, capsys):
    assert synthetic.main([str(tmp_path), "--seed", "2", "--n-train", "10", "--n-val", "3", "--n-test", "5",
                           "--image-size", "24"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert Path(printed) == tmp_path / synthetic.JSON_NAME
    assert len(_load(printed)["images"]) == 18
