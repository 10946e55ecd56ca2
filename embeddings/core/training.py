"""Train or fine-tune SigLIP with its pairwise sigmoid loss.

The loss is the one of Zhai et al. 2023, "Sigmoid Loss for Language Image
Pre-Training": for a batch of ``n`` matching (image, text) pairs with
L2-normalised embeddings ``x_i`` and ``y_j``::

    logit_ij = exp(t') * x_i . y_j + b
    label_ij = +1 if i == j else -1
    loss     = -(1 / n) * sum_i sum_j log sigmoid(label_ij * logit_ij)

``t'`` and ``b`` are the model's own ``logit_scale`` and ``logit_bias``
parameters, so a saved checkpoint carries them; a model trained from scratch
starts at ``t' = log 10`` and ``b = -10`` as in the paper.

Training data is a Karpathy split JSON (the format of Flickr30k and COCO, and
of :mod:`embeddings.core.synthetic`) plus its image folder.  Every step takes a batch
of training images, each with one of its captions drawn at random.  Images are
preprocessed once up front with the checkpoint's own preprocessing
(:class:`embeddings.core.siglip.ImagePreprocessor`, exactly what the search path
uses) and kept in memory; texts are padded to 64 tokens without an attention
mask, as :class:`embeddings.core.siglip.SiglipEncoder` encodes them.

Two ways to start:

* fine-tune a checkpoint (hub id or local directory), keeping its tokenizer::

      python -m embeddings.core.training --data dataset_flickr30k.json \\
          --image-root flickr30k-images --init google/siglip-base-patch16-224 \\
          --out runs/flickr --epochs 5 --batch-size 64 --lr 1e-5 --freeze-vision

* train from scratch: a SentencePiece vocabulary is learnt from the training
  captions and a small SigLIP is built with
  :func:`embeddings.core.checkpoints.tiny_siglip_config` (shape set with
  ``--model-json``)::

      python -m embeddings.core.training --data data.json --out runs/small --from-scratch

The offline demo model (a small SigLIP trained on the generated shapes world of
:mod:`embeddings.core.synthetic`) is reproduced with one command::

    python -m embeddings.core.training --demo --out embeddings/demo_model

Every run writes a complete checkpoint (model, tokenizer, preprocessing config)
loadable by :class:`embeddings.core.siglip.SiglipEncoder`, a ``training_history.json``
with loss and validation Recall@K after each epoch, and ``training_state.pt``
(optimizer, scheduler, step) from which ``--resume`` continues.

This module does not import Django.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from embeddings.core import synthetic
from embeddings.core.checkpoints import (
    canonicalize_text,
    save_checkpoint,
    tiny_siglip_config,
    train_sentencepiece_tokenizer,
)
from embeddings.core.siglip import TEXT_MAX_LENGTH, ImagePreprocessor, SiglipEncoder
from evaluation.core.metrics import retrieval_metrics

logger = logging.getLogger(__name__)

__all__ = [
    "DEMO_RECIPE",
    "TEXT_MAX_LENGTH",
    "KarpathyData",
    "TrainConfig",
    "TrainResult",
    "demo",
    "evaluate_checkpoint",
    "init_logit_parameters",
    "load_karpathy",
    "sigmoid_loss",
    "train",
]

STATE_FILE = "training_state.pt"
HISTORY_FILE = "training_history.json"
DEMO_METRICS_FILE = "demo_metrics.json"
INIT_LOGIT_SCALE = math.log(10.0)
INIT_LOGIT_BIAS = -10.0

ProgressCallback = Callable[[float, dict], None]


# --------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------
def sigmoid_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss for a batch of matching pairs.

    ``image_embeds`` and ``text_embeds`` are ``(n, d)`` and L2-normalised; row
    ``i`` of both belongs to the same pair.  ``logit_scale`` is ``t'`` (the
    temperature is ``exp(t')``) and ``logit_bias`` is ``b``.  Returns the sum
    over all ``n * n`` pairs of ``-log sigmoid(label * logit)`` divided by ``n``.
    """
    n = image_embeds.shape[0]
    logits = logit_scale.exp() * image_embeds @ text_embeds.t() + logit_bias
    labels = 2.0 * torch.eye(n, device=logits.device, dtype=logits.dtype) - 1.0
    return -F.logsigmoid(labels * logits).sum() / n


def init_logit_parameters(model, scale: float = INIT_LOGIT_SCALE, bias: float = INIT_LOGIT_BIAS) -> None:
    """Set the model's learnable temperature ``t'`` and bias ``b``.

    ``SiglipModel`` initialises both to zero; the paper starts from
    ``t' = log 10`` and ``b = -10``, which keeps the initial loss low despite
    the overwhelming number of negative pairs.
    """
    with torch.no_grad():
        model.logit_scale.fill_(float(scale))
        model.logit_bias.fill_(float(bias))


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------
@dataclass
class KarpathyData:
    """Images and captions of one or more splits of a Karpathy JSON."""

    paths: list[Path]
    captions: list[list[str]]

    def __len__(self) -> int:
        return len(self.paths)

    def flat_captions(self) -> tuple[list[str], np.ndarray]:
        """All captions and, for each, the index of its image."""
        texts = [t for caps in self.captions for t in caps]
        owner = np.repeat(np.arange(len(self.captions)), [len(c) for c in self.captions])
        return texts, owner.astype(np.int64)


def _resolve_image(entry: dict, json_dir: Path, image_root: Path | None) -> Path:
    filename = entry["filename"]
    filepath = entry.get("filepath") or ""
    roots = [image_root] if image_root is not None else []
    roots.append(json_dir)
    candidates = []
    for root in roots:
        candidates += [root / filepath / filename, root / filename, root / "images" / filename]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"image {filename!r} not found (looked in {', '.join(map(str, candidates))})")


def load_karpathy(json_path, splits, image_root=None) -> KarpathyData:
    """Read the images of ``splits`` (e.g. ``("train", "restval")``) from a
    Karpathy split JSON; image files are looked up under ``image_root`` (default:
    the JSON's folder), joined with the entry's ``filepath`` when it has one."""
    json_path = Path(json_path)
    if isinstance(splits, str):
        splits = (splits,)
    data = json.loads(json_path.read_text())
    root = Path(image_root) if image_root else None
    paths, captions = [], []
    for entry in data["images"]:
        if entry.get("split") not in splits:
            continue
        texts = [s["raw"].strip() for s in entry.get("sentences", []) if s.get("raw", "").strip()]
        if not texts:
            continue
        paths.append(_resolve_image(entry, json_path.parent, root))
        captions.append(texts)
    return KarpathyData(paths, captions)


def _split_names(json_path) -> set[str]:
    data = json.loads(Path(json_path).read_text())
    return {entry.get("split") for entry in data["images"]}


def _preprocess_paths(preprocessor, paths, desc: str, workers: int, progress: bool) -> np.ndarray:
    """(N, 3, H, W) float32 pixels of the images, preprocessed exactly as the
    search path does."""
    from tqdm import tqdm

    out = np.empty((len(paths), 3, preprocessor.height, preprocessor.width), dtype=np.float32)
    chunk = 256
    starts = range(0, len(paths), chunk)
    bar = tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, leave=False)
    if workers > 1 and len(paths) > 2 * chunk:
        # Threads suffice: Pillow and NumPy release the GIL for the heavy work.
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=workers) as pool:
            for s, block in zip(starts, pool.map(lambda s: preprocessor(paths[s : s + chunk]), starts)):
                out[s : s + len(block)] = block
                bar.update(len(block))
    else:
        for s in starts:
            block = preprocessor(paths[s : s + chunk])
            out[s : s + len(block)] = block
            bar.update(len(block))
    bar.close()
    return out


def tokenize(tokenizer, texts) -> torch.Tensor:
    """``(N, 64)`` input ids, padded and truncated like ``SiglipEncoder.tokenize``."""
    encoded = tokenizer(
        list(texts), padding="max_length", max_length=TEXT_MAX_LENGTH, truncation=True, return_tensors="pt"
    )
    return encoded["input_ids"]


@dataclass
class _Tensors:
    """One split, ready for the model."""

    pixels: torch.Tensor  # (N, 3, H, W) float32
    input_ids: torch.Tensor  # (M, 64) int64
    caption_image: np.ndarray  # (M,) image index of each caption
    first_caption: np.ndarray  # (N,) index of the first caption of each image
    n_captions: np.ndarray  # (N,)


def _tensors(data: KarpathyData, preprocessor, tokenizer, desc, workers, progress) -> _Tensors:
    pixels = _preprocess_paths(preprocessor, data.paths, desc, workers, progress)
    texts, owner = data.flat_captions()
    counts = np.array([len(c) for c in data.captions], dtype=np.int64)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    return _Tensors(torch.from_numpy(pixels), tokenize(tokenizer, texts), owner, first, counts)


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Everything that defines a training run."""

    data: str  # Karpathy split JSON
    out_dir: str  # where the checkpoint, history and training state go
    init: str | None = None  # checkpoint to fine-tune (hub id or directory); None: from scratch
    image_root: str | None = None  # image folder (default: the JSON's folder)
    train_splits: tuple[str, ...] = ("train", "restval")
    eval_splits: tuple[str, ...] = ("val",)  # Recall@K after every epoch
    final_split: str | None = "test"  # evaluated once at the end, through SiglipEncoder
    # model built from scratch: tiny_siglip_config(vocab, **model) and its vocabulary
    model: dict = field(default_factory=dict)
    vocab_size: int = 1000
    # std of a new model's vision position embeddings (None keeps SigLIP's 1/sqrt(width), which
    # leaves *where* things are almost invisible to a small model at first and slows learning it)
    vision_position_init_std: float | None = None
    # optimisation
    epochs: float = 10.0
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 256
    lr: float = 1e-3
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    warmup_steps: int | None = None  # default: warmup_fraction of all steps
    warmup_fraction: float = 0.05
    weight_decay: float = 0.1
    adam_betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float | None = 1.0
    freeze_vision: bool = False
    freeze_text: bool = False
    init_logit_scale: float | None = None  # None: log 10 from scratch, the checkpoint's own otherwise
    init_logit_bias: float | None = None  # None: -10 from scratch, the checkpoint's own otherwise
    logit_lr_multiplier: float = 1.0  # learning rate of t' and b relative to lr (short runs need them to move)
    seed: int = 0
    # budget and bookkeeping
    time_budget_s: float | None = None  # stop (and save) once training has run this long
    stop_at_step: int | None = None  # stop (and save) at this step without changing the schedule
    eval_every_epochs: int = 1  # validation Recall@K (and a history entry) every this many epochs
    save_every_epochs: int = 1  # checkpoint and training state every this many epochs
    keep_training_state: bool = True
    resume: bool = False
    eval_max_images: int | None = 1000
    # hardware
    device: str | None = None  # default: cuda when available
    cpu_bf16: bool = False  # bf16 autocast on CPU too (pays off for wide models on CPUs with AMX / AVX512-BF16)
    attn_implementation: str | None = None  # e.g. "eager" or "sdpa" while training; None: the model's default
    num_threads: int | None = None
    preprocess_workers: int = 0  # 0: os.cpu_count()
    progress: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in values.items() if k in names}
        for key in ("train_splits", "eval_splits", "adam_betas"):
            if key in values and values[key] is not None:
                values[key] = tuple(values[key])
        return cls(**values)


@dataclass
class TrainResult:
    checkpoint_dir: Path
    history: list[dict]
    final_metrics: dict | None
    step: int = 0
    completed: bool = True  # False when stopped early by a budget or stop_at_step
    model: object = field(default=None, repr=False)  # the trained SiglipModel, in memory
    threads: int = 0  # torch threads used


# --------------------------------------------------------------------------
# Model helpers
# --------------------------------------------------------------------------
def _image_features(model, pixels: torch.Tensor) -> torch.Tensor:
    return F.normalize(model.get_image_features(pixel_values=pixels).pooler_output.float(), dim=-1)


def _text_features(model, input_ids: torch.Tensor) -> torch.Tensor:
    # No attention mask: SigLIP pools the last (padding) position, and the
    # search path encodes texts the same way.
    return F.normalize(model.get_text_features(input_ids=input_ids).pooler_output.float(), dim=-1)


def _autocast(device: torch.device, cpu_bf16: bool = False):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(cpu_bf16))


@torch.inference_mode()
def _embed(model, tensors: _Tensors, device, n_images: int | None = None, batch: int = 256, cpu_bf16=False):
    n = len(tensors.pixels) if n_images is None else min(n_images, len(tensors.pixels))
    keep = tensors.caption_image < n
    images, texts = [], []
    with _autocast(device, cpu_bf16):
        for s in range(0, n, batch):
            images.append(_image_features(model, tensors.pixels[s : min(n, s + batch)].to(device)).cpu())
        ids = tensors.input_ids[torch.from_numpy(keep)]
        for s in range(0, len(ids), batch):
            texts.append(_text_features(model, ids[s : s + batch].to(device)).cpu())
    return (
        torch.cat(images).float().numpy(),
        torch.cat(texts).float().numpy(),
        tensors.caption_image[keep],
    )


def _evaluate(model, tensors: _Tensors, device, n_images: int | None, cpu_bf16=False) -> dict:

    was_training = model.training
    model.eval()
    try:
        images, texts, owner = _embed(model, tensors, device, n_images, cpu_bf16=cpu_bf16)
    finally:
        model.train(was_training)
    return retrieval_metrics(images, texts, owner)


def evaluate_checkpoint(checkpoint_dir, data_json, split: str = "test", image_root=None, device=None) -> dict:
    """Recall@K / mAP of a saved checkpoint on one split, encoded through
    :class:`embeddings.core.siglip.SiglipEncoder` (the search path)."""

    data = load_karpathy(data_json, (split,), image_root)
    encoder = SiglipEncoder(str(checkpoint_dir), device=device).load()
    images = encoder.encode_images([str(p) for p in data.paths], batch_size=256)
    texts, owner = data.flat_captions()
    text_vectors = encoder.encode_texts(texts, batch_size=256)
    return retrieval_metrics(images, text_vectors, owner)


def _tokenizer_corpus(texts: list[str]) -> list[str]:
    """Training captions plus each distinct word once on its own.

    The single-word lines let SentencePiece's unigram trainer keep frequent
    words (colour and object names, say) as whole pieces on small, repetitive
    corpora, where it otherwise tends to split them into fragments.
    """

    words = sorted({w for t in texts for w in canonicalize_text(t).split()})
    return list(texts) + words


def _build_model(config: TrainConfig, train_texts: list[str], out_dir: Path):
    """(model, tokenizer) to start from: a checkpoint, or a new small SigLIP."""
    from transformers import AutoTokenizer, SiglipModel

    if config.init:
        tokenizer = AutoTokenizer.from_pretrained(config.init)
        model = SiglipModel.from_pretrained(config.init, dtype=torch.float32)
        if config.init_logit_scale is not None or config.init_logit_bias is not None:
            init_logit_parameters(
                model,
                float(model.logit_scale.item() if config.init_logit_scale is None else config.init_logit_scale),
                float(model.logit_bias.item() if config.init_logit_bias is None else config.init_logit_bias),
            )
        return model, tokenizer


    tokenizer = train_sentencepiece_tokenizer(_tokenizer_corpus(train_texts), out_dir, vocab_size=config.vocab_size)
    model_config = tiny_siglip_config(len(tokenizer), **copy.deepcopy(config.model))
    model_config.text_config.pad_token_id = tokenizer.pad_token_id
    model_config.text_config.eos_token_id = tokenizer.eos_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = SiglipModel(model_config)
        _custom_init(model, config)
    init_logit_parameters(
        model,
        INIT_LOGIT_SCALE if config.init_logit_scale is None else config.init_logit_scale,
        INIT_LOGIT_BIAS if config.init_logit_bias is None else config.init_logit_bias,
    )
    return model, tokenizer


@torch.no_grad()
def _custom_init(model, config: TrainConfig) -> None:
    """The from-scratch initialisation options of ``config`` (see :class:`TrainConfig`)."""
    if config.vision_position_init_std is not None:
        torch.nn.init.normal_(model.vision_model.embeddings.position_embedding.weight,
                              std=config.vision_position_init_std)


def _freeze(model, config: TrainConfig) -> None:
    for p in model.vision_model.parameters():
        p.requires_grad_(not config.freeze_vision)
    for p in model.text_model.parameters():
        p.requires_grad_(not config.freeze_text)


def _optimizer(model, config: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay, logit = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in ("logit_scale", "logit_bias"):
            logit.append(p)
        elif p.ndim < 2 or "norm" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        {"params": logit, "weight_decay": 0.0, "lr": config.lr * config.logit_lr_multiplier},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.adam_betas))


def _schedule(optimizer, total_steps: int, warmup_steps: int, min_ratio: float):
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _epoch_plan(seed: int, epoch: int, tensors: _Tensors, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Image order and the caption drawn for each image in one epoch (a pure
    function of seed and epoch, so a resumed run sees the same batches)."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(tensors.pixels))
    pick = (rng.random(len(order)) * tensors.n_captions[order]).astype(np.int64)
    captions = tensors.first_caption[order] + pick
    return order, captions


def _write_json(path: Path, payload) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------
def train(config: TrainConfig, on_progress: ProgressCallback | None = None) -> TrainResult:
    """Run (or resume) training as described by ``config``.

    ``on_progress(fraction, info)`` is called at most about once per percent of
    the run and after every epoch (``info`` has the step, epoch, loss and, after
    an evaluation, the metrics).
    """
    threads = torch.get_num_threads()
    try:
        if config.num_threads:
            torch.set_num_threads(int(config.num_threads))
        return _train(config, on_progress)
    finally:
        torch.set_num_threads(threads)


def _train(config: TrainConfig, on_progress: ProgressCallback | None) -> TrainResult:
    """The stages of a training run: prepare (data, model, optimiser, or a resumed state),
    then epochs of steps, each followed by an evaluation and a save when due, then the
    final measurement."""
    run = _TrainingRun(config, on_progress)
    run.fit()
    return run.finish()


class _TrainingRun:
    """One training run's state, advanced by its stages."""

    def __init__(self, config: TrainConfig, on_progress: ProgressCallback | None):
        from transformers import AutoTokenizer, SiglipModel

        self.config, self.on_progress = config, on_progress
        self.started = time.perf_counter()
        self.out_dir = out_dir = Path(config.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        workers = config.preprocess_workers or (os.cpu_count() or 1)
        self.state_path = out_dir / STATE_FILE

        train_data = load_karpathy(config.data, config.train_splits, config.image_root)
        if len(train_data) < 2:
            raise ValueError(f"{config.data} has fewer than 2 images in the splits {config.train_splits}")
        train_texts = [t for caps in train_data.captions for t in caps]

        state = None
        if config.resume and self.state_path.exists():
            state = torch.load(self.state_path, map_location="cpu", weights_only=False)
            self.tokenizer = AutoTokenizer.from_pretrained(str(out_dir))
            self.model = SiglipModel.from_pretrained(str(out_dir), dtype=torch.float32)
            logger.info("resuming from step %d in %s", state["step"], out_dir)
        else:
            self.model, self.tokenizer = _build_model(config, train_texts, out_dir)
            save_checkpoint(self.model, self.tokenizer, out_dir)  # also writes the preprocessing config
        model = self.model
        preprocessor = ImagePreprocessor.from_pretrained(
            str(out_dir), default_size=int(model.config.vision_config.image_size)
        )

        _freeze(model, config)
        self.cpu_bf16 = bool(config.cpu_bf16)
        if config.attn_implementation:
            model.set_attn_implementation(config.attn_implementation)
        model.to(self.device)
        model.train()

        self.train_tensors = _tensors(train_data, preprocessor, self.tokenizer, "preprocessing train", workers,
                                      config.progress)
        self.available = _split_names(config.data)
        self.eval_tensors = {}
        for split in config.eval_splits:
            if split in self.available:
                data = load_karpathy(config.data, (split,), config.image_root)
                self.eval_tensors[split] = _tensors(data, preprocessor, self.tokenizer, f"preprocessing {split}",
                                                    workers, False)

        n_train = len(train_data)
        self.batch_size = min(config.batch_size, n_train)
        self.steps_per_epoch = max(1, n_train // self.batch_size)
        self.total_steps = config.max_steps or max(1, int(round(config.epochs * self.steps_per_epoch)))
        warmup = config.warmup_steps if config.warmup_steps is not None else int(config.warmup_fraction * self.total_steps)
        warmup = min(warmup, self.total_steps)
        self.optimizer = _optimizer(model, config)
        self.scheduler = _schedule(self.optimizer, self.total_steps, warmup, config.min_lr_ratio)

        self.step, self.history, self.train_seconds, self.train_cpu_seconds = 0, [], 0.0, 0.0
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.step = int(state["step"])
            self.history = list(state.get("history", []))
            self.train_seconds = float(state.get("train_seconds", 0.0))
            self.train_cpu_seconds = float(state.get("train_cpu_seconds", 0.0))
            torch.set_rng_state(state["torch_rng"])
        self.epoch_losses: list[float] = []
        self.smoothed = None

    def report(self, info: dict) -> None:
        if self.on_progress is not None:
            self.on_progress(float(min(1.0, self.step / self.total_steps)), {"step": self.step,
                                                                           "total_steps": self.total_steps, **info})

    def save(self, completed: bool) -> None:
        config = self.config
        save_checkpoint(self.model, self.tokenizer, self.out_dir)
        _write_json(self.out_dir / HISTORY_FILE, {"config": config.to_dict(), "completed": completed,
                                                 "total_steps": self.total_steps, "history": self.history})
        if config.keep_training_state:
            torch.save(
                {
                    "step": self.step,
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "history": self.history,
                    "train_seconds": self.train_seconds,
                    "train_cpu_seconds": self.train_cpu_seconds,
                    "torch_rng": torch.get_rng_state(),
                    "config": config.to_dict(),
                },
                self.state_path,
            )
        elif self.state_path.exists():
            self.state_path.unlink()

    def train_step(self, idx: torch.Tensor, cap: torch.Tensor) -> float:
        """One optimiser step on the images ``idx`` with the captions ``cap``; the loss."""
        model, config = self.model, self.config
        t0, c0 = time.perf_counter(), time.process_time()
        pixels = self.train_tensors.pixels.index_select(0, idx).to(self.device, non_blocking=True)
        input_ids = self.train_tensors.input_ids.index_select(0, cap).to(self.device, non_blocking=True)
        with _autocast(self.device, self.cpu_bf16):
            image_embeds = _image_features(model, pixels)
            text_embeds = _text_features(model, input_ids)
        loss = sigmoid_loss(image_embeds, text_embeds, model.logit_scale.float(), model.logit_bias.float())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.train_seconds += time.perf_counter() - t0
        self.train_cpu_seconds += time.process_time() - c0
        value = float(loss.detach())
        self.epoch_losses.append(value)
        self.smoothed = value if self.smoothed is None else 0.95 * self.smoothed + 0.05 * value
        return value

    def evaluate(self, bar) -> None:
        """Measure every evaluation split now, into the history and the progress report."""
        metrics = {
            split: _evaluate(self.model, t, self.device, self.config.eval_max_images)
            for split, t in self.eval_tensors.items()
        }
        entry = {
            "epoch": round(self.step / self.steps_per_epoch, 4),
            "step": self.step,
            "elapsed_s": round(time.perf_counter() - self.started, 2),
            "train_s": round(self.train_seconds, 2),
            "train_cpu_s": round(self.train_cpu_seconds, 2),
            "loss": float(np.mean(self.epoch_losses)) if self.epoch_losses else None,
            "lr": float(self.scheduler.get_last_lr()[0]),
            "logit_scale": float(self.model.logit_scale.item()),
            "logit_bias": float(self.model.logit_bias.item()),
            "metrics": metrics,
        }
        self.history.append(entry)
        self.epoch_losses = []
        summary = " ".join(
            f"{s}: t2i R@1 {m['text_to_image']['recall@1']:.3f} R@5 {m['text_to_image']['recall@5']:.3f}"
            f" i2t R@1 {m['image_to_text']['recall@1']:.3f}"
            for s, m in metrics.items()
        )
        loss_text = "-" if entry["loss"] is None else f"{entry['loss']:.4f}"
        bar.write(f"epoch {entry['epoch']:g} step {self.step} loss {loss_text} train {self.train_seconds:.0f}s {summary}")
        self.report({"epoch": entry["epoch"], "loss": entry["loss"], "metrics": metrics})

    def fit(self) -> None:
        """Epochs of steps until the schedule, the time budget or ``stop_at_step`` ends them."""
        from tqdm import tqdm

        config, per_epoch, total = self.config, self.steps_per_epoch, self.total_steps
        bar = tqdm(total=total, initial=self.step, desc="training", unit="step", disable=not config.progress)
        last_percent = -1
        stopped_early = False
        while self.step < total:
            epoch = self.step // per_epoch
            order, captions = _epoch_plan(config.seed, epoch, self.train_tensors, self.batch_size)
            for b in range(self.step - epoch * per_epoch, per_epoch):
                batch = slice(b * self.batch_size, (b + 1) * self.batch_size)
                self.train_step(torch.from_numpy(order[batch]), torch.from_numpy(captions[batch]))
                bar.update(1)
                bar.set_postfix(loss=f"{self.smoothed:.3f}", t=f"{self.model.logit_scale.exp().item():.1f}")
                percent = int(100 * self.step / total)
                if percent != last_percent:
                    last_percent = percent
                    self.report({"epoch": epoch, "loss": self.smoothed})
                budget_hit = config.time_budget_s is not None and self.train_seconds >= config.time_budget_s
                stop_hit = config.stop_at_step is not None and self.step >= config.stop_at_step
                if self.step >= total or budget_hit or stop_hit:
                    stopped_early = self.step < total
                    break
            finished = self.step >= total
            epoch_done = self.step % per_epoch == 0 or finished
            epochs_done = self.step // per_epoch
            if finished or stopped_early or (epoch_done and epochs_done % max(1, config.eval_every_epochs) == 0):
                self.evaluate(bar)
            if finished or stopped_early or (epoch_done and epochs_done % max(1, config.save_every_epochs) == 0):
                self.save(completed=finished)
            if stopped_early:
                break
        bar.close()

    def finish(self) -> TrainResult:
        """The last save, the final split measured through the search encoder, the result."""
        config = self.config
        completed = self.step >= self.total_steps
        if not self.history or self.history[-1]["step"] != self.step:
            self.save(completed=completed)
        final_metrics = None
        if completed and config.final_split and config.final_split in self.available:
            final_metrics = evaluate_checkpoint(self.out_dir, config.data, config.final_split, config.image_root,
                                                device=str(self.device))
            _write_json(self.out_dir / HISTORY_FILE, {"config": config.to_dict(), "completed": completed,
                                                     "total_steps": self.total_steps, "history": self.history,
                                                     "final_split": config.final_split,
                                                     "final_metrics": final_metrics})
        self.report({"done": completed, "final_metrics": final_metrics})
        self.model.eval()
        return TrainResult(self.out_dir, self.history, final_metrics, step=self.step, completed=completed,
                           model=self.model, threads=torch.get_num_threads())


# --------------------------------------------------------------------------
# The offline demo model
# --------------------------------------------------------------------------
DEMO_RECIPE = {
    # 40 px pictures in 8 px patches: a 5 x 5 grid whose middle row and column line up with
    # the left / centre / right and top / centre / bottom places of the shapes
    "model": {
        "image_size": 40,
        "patch_size": 8,
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
    },
    "vocab_size": 1000,
    "vision_position_init_std": 0.5,
    "batch_size": 128,
    "max_steps": 5000,
    "lr": 2e-3,
    "warmup_steps": 40,
    "weight_decay": 0.1,
    "grad_clip": 1.0,
    "seed": 0,
    "eval_every_epochs": 4,
    "save_every_epochs": 1000,
}


def demo(out_dir="embeddings/demo_model", data_dir=None, *, num_threads=None, progress=True,
         recipe: dict | None = None, data: dict | None = None, on_progress=None) -> Path:
    """Generate the shapes data set, train the demo SigLIP on it from scratch,
    measure it on the held-out test split through ``SiglipEncoder`` and save
    it (with ``demo_metrics.json``) to ``out_dir``."""

    data_params = dict(synthetic.DEMO_DATA, **(data or {}))
    recipe = dict(DEMO_RECIPE, **(recipe or {}))
    out = Path(out_dir)
    tmp = None
    if data_dir is None:
        tmp = tempfile.mkdtemp(prefix="shapes-")
        data_dir = tmp
    try:
        t0 = time.perf_counter()
        json_path = synthetic.generate(data_dir, progress=progress, **data_params)
        generate_s = time.perf_counter() - t0
        # Train into a fresh folder so no stale files end up in the checkpoint.
        work = Path(tempfile.mkdtemp(prefix="demo-model-"))
        config = TrainConfig(
            # test is only watched (for the learning curve), never used to choose anything
            data=str(json_path), out_dir=str(work), train_splits=("train",), eval_splits=("val", "test"),
            final_split="test", keep_training_state=False, num_threads=num_threads, progress=progress,
            **recipe,
        )
        t1 = time.perf_counter()
        result = train(config, on_progress=on_progress)
        total_s = time.perf_counter() - t1
        last = result.history[-1]
        metrics = {
            "split": "test",
            "test_images": len(load_karpathy(json_path, ("test",))),
            "test_metrics": result.final_metrics,
            "train_seconds": last["train_s"],
            "train_cpu_seconds": last["train_cpu_s"],
            "run_seconds": round(total_s, 2),
            "generate_seconds": round(generate_s, 2),
            "steps": result.step,
            "torch_threads": result.threads,
            "data": data_params,
            "recipe": recipe,
            "learning_curve": [
                {"train_s": h["train_s"], "step": h["step"], "epoch": h["epoch"], "loss": h["loss"],
                 **{f"{split}_{d}_R@{k}": m[d][f"recall@{k}"]
                    for split, m in h["metrics"].items()
                    for d in ("text_to_image", "image_to_text") for k in (1, 5)}}
                for h in result.history
            ],
        }
        _write_json(work / DEMO_METRICS_FILE, metrics)
        if out.exists():
            for name in os.listdir(out):
                target = out / name
                if target.is_dir():
                    shutil.rmtree(target)
                else:
                    target.unlink()
        out.mkdir(parents=True, exist_ok=True)
        for name in os.listdir(work):
            shutil.move(str(work / name), str(out / name))
        shutil.rmtree(work, ignore_errors=True)
        return out
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train or fine-tune SigLIP with the sigmoid loss.")
    p.add_argument("--demo", action="store_true",
                   help="generate the shapes data set and train the offline demo model on it")
    p.add_argument("--data", help="Karpathy split JSON")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--data-dir", help="with --demo: where to write the generated data set (default: a temp dir)")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--from-scratch", action="store_true", help="new small SigLIP and vocabulary (default)")
    start.add_argument("--init", help="checkpoint to fine-tune: hub id or local directory")
    p.add_argument("--image-root", help="image folder (default: the JSON's folder)")
    p.add_argument("--train-splits", default="train,restval")
    p.add_argument("--eval-splits", default="val")
    p.add_argument("--final-split", default="test")
    p.add_argument("--model-json", help='from scratch: tiny_siglip_config overrides, e.g. \'{"hidden_size": 128}\'')
    p.add_argument("--options-json", help="any other TrainConfig fields, as a JSON object")
    p.add_argument("--vocab-size", type=int)
    p.add_argument("--epochs", type=float)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--min-lr-ratio", type=float)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--warmup-fraction", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--grad-clip", type=float)
    p.add_argument("--freeze-vision", action="store_true")
    p.add_argument("--freeze-text", action="store_true")
    p.add_argument("--seed", type=int)
    p.add_argument("--time-budget", type=float, dest="time_budget_s", help="seconds of training at most")
    p.add_argument("--stop-at-step", type=int)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--no-training-state", action="store_true", help="do not keep training_state.pt")
    p.add_argument("--device")
    p.add_argument("--cpu-bf16", action="store_true", help="bf16 autocast on CPU as well")
    p.add_argument("--threads", type=int, dest="num_threads")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    overrides = {
        k: getattr(args, k)
        for k in ("vocab_size", "epochs", "max_steps", "batch_size", "lr", "min_lr_ratio", "warmup_steps",
                  "warmup_fraction", "weight_decay", "grad_clip", "seed", "time_budget_s")
        if getattr(args, k) is not None
    }
    if args.options_json:
        overrides.update(json.loads(args.options_json))
    if args.model_json:
        overrides["model"] = json.loads(args.model_json)
    if args.demo:
        out = demo(args.out, args.data_dir, num_threads=args.num_threads, progress=not args.quiet,
                   recipe=overrides or None)
        print(json.dumps(json.loads((out / DEMO_METRICS_FILE).read_text())["test_metrics"], indent=2))
        return 0
    if not args.data:
        raise SystemExit("--data is required (or use --demo)")
    config = TrainConfig(
        data=args.data,
        out_dir=args.out,
        init=args.init,
        image_root=args.image_root,
        train_splits=tuple(s for s in args.train_splits.split(",") if s),
        eval_splits=tuple(s for s in args.eval_splits.split(",") if s),
        final_split=args.final_split or None,
        freeze_vision=args.freeze_vision,
        freeze_text=args.freeze_text,
        stop_at_step=args.stop_at_step,
        resume=args.resume,
        keep_training_state=not args.no_training_state,
        device=args.device,
        cpu_bf16=args.cpu_bf16,
        num_threads=args.num_threads,
        progress=not args.quiet,
        **overrides,
    )
    result = train(config)
    if result.final_metrics:
        print(json.dumps(result.final_metrics, indent=2))
    print(result.checkpoint_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
