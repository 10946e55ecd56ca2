"""Calibration of match probabilities: ECE and the reliability bins, on cases with known answers."""

import numpy as np
import pytest

from evaluation.core.metrics import match_calibration


def test_a_model_whose_probabilities_are_the_truth_has_no_calibration_error():
    # Orthogonal unit vectors: a caption's own image has cosine 1, every other 0. With a head
    # mapping 1 -> ~1 and 0 -> ~0, probabilities equal the labels.
    images = np.eye(4, dtype=np.float32)
    texts = np.repeat(images, 2, axis=0)  # two captions per image
    result = match_calibration(texts, images, np.repeat(np.arange(4), 2), scale=40.0, bias=-20.0)
    assert result["pairs"] == 8 * 4 and result["positives"] == 8
    assert result["ece"] == pytest.approx(0.0, abs=1e-8)
    assert result["bins"][-1]["pairs"] == 8 and result["bins"][0]["pairs"] == 24


def test_a_head_that_says_one_half_for_everything_is_off_by_its_gap_to_the_positive_rate():
    images = np.eye(4, dtype=np.float32)
    texts = images.copy()
    result = match_calibration(texts, images, np.arange(4), scale=0.0, bias=0.0, bins=10)
    # every pair in the 0.5 bin; a quarter of them true
    (only,) = [b for b in result["bins"] if b["pairs"]]
    assert only["low"] == 0.5 and only["mean_probability"] == pytest.approx(0.5)
    assert only["positive_rate"] == pytest.approx(0.25)
    assert result["ece"] == pytest.approx(0.25)


def test_chunks_do_not_change_the_answer():
    rng = np.random.default_rng(0)
    images = rng.standard_normal((30, 8)).astype(np.float32)
    texts = rng.standard_normal((70, 8)).astype(np.float32)
    mapping = rng.integers(0, 30, 70)
    whole = match_calibration(texts, images, mapping, scale=3.0, bias=-1.0, chunk=1000)
    pieces = match_calibration(texts, images, mapping, scale=3.0, bias=-1.0, chunk=7)
    assert whole["ece"] == pytest.approx(pieces["ece"])
    assert [b["pairs"] for b in whole["bins"]] == [b["pairs"] for b in pieces["bins"]]


@pytest.mark.parametrize("scale, bins, message", [(float("nan"), 10, "finite"), (1.0, 0, "at least 1")])
def test_bad_parameters_are_refused(scale, bins, message):
    with pytest.raises(ValueError, match=message):
        match_calibration(np.eye(2), np.eye(2), [0, 1], scale=scale, bias=0.0, bins=bins)
