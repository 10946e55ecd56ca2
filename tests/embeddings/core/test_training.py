"""SigLIP training: the sigmoid loss, a short run from scratch, checkpoints and resuming."""

import json
import math

import numpy as np
import pytest
import torch

from embeddings.core import synthetic, training
from embeddings.core.siglip import ImagePreprocessor, SiglipEncoder
from embeddings.core.training import TrainConfig, sigmoid_loss, train

N_TEST = 60
# A model small enough to train in seconds on a laptop CPU.
TINY_MODEL = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Small models train fastest on one thread, and much faster than on two
    # when other processes compete for the cores.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data_json(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    return synthetic.generate(out, seed=0, n_train=1024, n_val=20, n_test=N_TEST, image_size=32)


def _config(data_json, out_dir, **overrides) -> TrainConfig:
    values = dict(
        data=str(data_json),
        out_dir=str(out_dir),
        train_splits=("train",),
        eval_splits=("val",),
        final_split="test",
        model=dict(TINY_MODEL),
        batch_size=64,
        epochs=1,
        lr=2e-3,
        warmup_steps=2,
        num_threads=1,
        progress=False,
    )
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def short_run(data_json, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    calls = []
    config = _config(data_json, out, epochs=8, batch_size=128, lr=3e-3, warmup_steps=4,
                     logit_lr_multiplier=10.0)
    result = train(config, on_progress=lambda fraction, info: calls.append((fraction, info)))
    return config, result, calls


# -- the loss -----------------------------------------------------------------


def test_sigmoid_loss_matches_a_direct_double_loop_over_pairs():
    gen = torch.Generator().manual_seed(0)
    n, d = 5, 8
    images = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=-1)
    t_prime, b = torch.tensor([0.7]), torch.tensor([-1.3])

    total = 0.0
    for i in range(n):
        for j in range(n):
            label = 1.0 if i == j else -1.0
            logit = math.exp(t_prime.item()) * float(images[i] @ texts[j]) + b.item()
            total += -math.log(1.0 / (1.0 + math.exp(-label * logit)))
    expected = total / n

    assert sigmoid_loss(images, texts, t_prime, b).item() == pytest.approx(expected, rel=1e-5)


def test_sigmoid_loss_decreases_over_a_few_optimiser_steps_on_a_toy_batch():
    from transformers import SiglipModel

    from embeddings.core.checkpoints import tiny_siglip_config

    torch.manual_seed(0)
    model = SiglipModel(tiny_siglip_config(50, image_size=16, patch_size=8))
    training.init_logit_parameters(model)
    pixels = torch.randn(8, 3, 16, 16)
    input_ids = torch.randint(3, 50, (8, training.TEXT_MAX_LENGTH))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def loss_now():
        images = training._image_features(model, pixels)
        texts = training._text_features(model, input_ids)
        return sigmoid_loss(images, texts, model.logit_scale, model.logit_bias)

    losses = []
    for _ in range(8):
        loss = loss_now()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert loss_now().item() < 0.5 * losses[0]


def test_model_built_from_scratch_starts_at_log_10_temperature_and_minus_10_bias(data_json, tmp_path):
    from transformers import SiglipModel

    config = _config(data_json, tmp_path)
    model, tokenizer = training._build_model(config, ["a small red circle", "a big blue star"], tmp_path)
    assert model.logit_scale.item() == pytest.approx(math.log(10.0))
    assert model.logit_bias.item() == pytest.approx(-10.0)
    # SiglipModel alone would start both at zero
    assert SiglipModel(model.config).logit_scale.item() == 0.0


def test_colour_and_shape_words_are_single_tokens_of_a_vocabulary_learnt_from_scratch(tmp_path):
    from embeddings.core.checkpoints import train_sentencepiece_tokenizer

    captions = [c for i in range(300)
                for c in synthetic.captions_for(synthetic.all_compositions()[i * 7], seed=i, partial=True)]
    tokenizer = train_sentencepiece_tokenizer(training._tokenizer_corpus(captions), tmp_path, vocab_size=1000)
    for word in list(synthetic.COLOURS) + list(synthetic.SHAPES) + ["small", "large", "left", "top"]:
        assert tokenizer.tokenize(word) == ["\u2581" + word]


# -- a short run from scratch ---------------------------------------------------


def test_short_run_retrieves_held_out_compositions_far_better_than_chance(short_run):
    _, result, _ = short_run
    metrics = result.final_metrics  # measured through SiglipEncoder on the unseen test compositions
    # Mean rank over all queries is far steadier on 60 test images than Recall@5.
    # At chance, a caption's image sits at rank (N + 1) / 2 = 30.5, and an image's best
    # of its 5 captions among 300 at about 301 / 6 = 50.2.
    chance_t2i = (N_TEST + 1) / 2
    chance_i2t = (5 * N_TEST + 1) / 6
    assert metrics["text_to_image"]["mean_rank"] <= chance_t2i / 2, metrics
    assert metrics["image_to_text"]["mean_rank"] <= chance_i2t / 2, metrics
    # A few seconds of training learns colour, size and background but not yet shape or
    # position, so Recall@5 is still modest (about 0.25 both ways; chance is about 0.08).
    assert metrics["text_to_image"]["recall@5"] > 2 * 5 / N_TEST, metrics


def test_temperature_and_bias_are_learnt_and_saved_with_the_checkpoint(short_run):
    from transformers import SiglipModel

    _, result, _ = short_run
    saved = SiglipModel.from_pretrained(str(result.checkpoint_dir))
    assert saved.logit_scale.item() == pytest.approx(result.model.logit_scale.item())
    assert saved.logit_bias.item() == pytest.approx(result.model.logit_bias.item())
    assert saved.logit_scale.item() != pytest.approx(math.log(10.0))


def test_history_has_one_entry_per_epoch_with_validation_recall(short_run):
    config, result, _ = short_run
    assert [round(h["epoch"]) for h in result.history] == list(range(1, 9))
    steps = [h["step"] for h in result.history]
    assert steps == sorted(steps) and steps[-1] == result.step
    for entry in result.history:
        for direction in ("text_to_image", "image_to_text"):
            assert 0.0 <= entry["metrics"]["val"][direction]["recall@5"] <= 1.0
        assert entry["elapsed_s"] >= entry["train_s"] > 0
    written = json.loads((result.checkpoint_dir / training.HISTORY_FILE).read_text())
    assert written["history"] == json.loads(json.dumps(result.history))
    assert written["final_metrics"] == result.final_metrics
    assert written["config"]["batch_size"] == config.batch_size


def test_progress_callback_reports_rising_fractions_up_to_one(short_run):
    _, _, calls = short_run
    fractions = [f for f, _ in calls]
    assert fractions == sorted(fractions)
    assert fractions[-1] == 1.0
    assert 10 <= len(calls) <= 150  # about once per percent, not once per step
    assert any("metrics" in info for _, info in calls)


def test_saved_checkpoint_encodes_exactly_like_the_in_memory_model(short_run, data_json):
    _, result, _ = short_run
    data = training.load_karpathy(data_json, ("test",))
    paths = [str(p) for p in data.paths[:16]]
    texts = [caps[0] for caps in data.captions[:16]] + ["a small red circle"]

    encoder = SiglipEncoder(str(result.checkpoint_dir), device="cpu").load()
    pixels = ImagePreprocessor.from_pretrained(str(result.checkpoint_dir))(paths)
    with torch.inference_mode():
        image_expected = training._image_features(result.model, torch.from_numpy(pixels)).numpy()
        text_expected = training._text_features(
            result.model, training.tokenize(encoder.tokenizer, texts)
        ).numpy()

    np.testing.assert_allclose(encoder.encode_images(paths), image_expected, atol=1e-5)
    np.testing.assert_allclose(encoder.encode_texts(texts), text_expected, atol=1e-5)


def test_training_preprocesses_images_exactly_like_the_encoder(short_run, data_json):
    _, result, _ = short_run
    data = training.load_karpathy(data_json, ("val",))
    encoder = SiglipEncoder(str(result.checkpoint_dir), device="cpu")
    preprocessor = ImagePreprocessor.from_pretrained(str(result.checkpoint_dir))
    cached = training._preprocess_paths(preprocessor, data.paths, "", workers=1, progress=False)
    np.testing.assert_array_equal(cached, encoder.preprocess([str(p) for p in data.paths]))


# -- resuming and fine-tuning ---------------------------------------------------


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_continues_from_the_saved_step_and_matches_an_uninterrupted_run(data_json, tmp_path):
    common = dict(max_steps=6, batch_size=64, final_split=None, eval_splits=())
    first = train(_config(data_json, tmp_path / "resumed", stop_at_step=4, **common))
    assert (first.step, first.completed) == (4, False)
    state = torch.load(tmp_path / "resumed" / training.STATE_FILE, weights_only=False)
    assert state["step"] == 4 and state["scheduler"]["last_epoch"] == 4

    resumed = train(_config(data_json, tmp_path / "resumed", resume=True, **common))
    assert (resumed.step, resumed.completed) == (6, True)
    state = torch.load(tmp_path / "resumed" / training.STATE_FILE, weights_only=False)
    assert state["step"] == 6 and state["scheduler"]["last_epoch"] == 6
    assert [h["step"] for h in resumed.history][0] == 4  # the entry written before stopping is kept

    straight = train(_config(data_json, tmp_path / "straight", **common))
    a, b = _weights(resumed.model), _weights(straight.model)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


def test_fine_tuning_keeps_the_tokenizer_and_frozen_tower(short_run, data_json, tmp_path):
    _, base, _ = short_run
    config = _config(data_json, tmp_path, init=str(base.checkpoint_dir), model={}, max_steps=3,
                     freeze_vision=True, final_split=None, eval_splits=())
    result = train(config)
    before, after = _weights(base.model), _weights(result.model)
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("vision_model."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("text_model."))
    assert (tmp_path / "spiece.model").read_bytes() == (base.checkpoint_dir / "spiece.model").read_bytes()


def test_command_line_trains_from_scratch(data_json, tmp_path, capsys):
    code = training.main([
        "--data", str(data_json), "--out", str(tmp_path), "--from-scratch", "--max-steps", "2",
        "--batch-size", "32", "--train-splits", "train", "--eval-splits", "", "--threads", "1", "--quiet",
        "--model-json", json.dumps(TINY_MODEL),
    ])
    assert code == 0
    assert SiglipEncoder(str(tmp_path), device="cpu").encode_texts(["a red star"]).shape == (1, 64)
    assert "recall@5" in capsys.readouterr().out
