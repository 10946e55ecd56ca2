"""SigLIP image and text encoder.

Maps images and texts into SigLIP's shared embedding space as L2-normalised
float32 vectors, ready for cosine / inner-product search.

* :func:`load_image` decodes bytes, paths or file objects with Pillow and turns
  them into a plain RGB image (EXIF orientation applied, first frame of
  animations, transparency composited on white, 16-bit greyscale scaled).
* :class:`ImagePreprocessor` is the checkpoint's image preprocessing written
  with Pillow and NumPy only; it is picklable, so it can run in worker
  processes that never load the model.
* :class:`SiglipEncoder` loads a checkpoint lazily (hub id or local directory)
  and encodes pixels, images and texts.
* :func:`get_encoder` keeps one encoder per ``(source, device, backend)`` per
  process.

How the towers run (torch fp32/bf16, torch int8, ONNX Runtime fp32 or int8) is
chosen with ``backend``; see :mod:`embeddings.core.inference`.

This module does not import Django.
"""

from __future__ import annotations

import copy
import io
import logging
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MODEL",
    "SOURCE_ENV_VAR",
    "TEXT_MAX_LENGTH",
    "ImagePreprocessor",
    "ModelNotAvailable",
    "SiglipEncoder",
    "clear_encoder_cache",
    "get_encoder",
    "load_image",
    "model_source_from_env",
    "to_rgb",
]

DEFAULT_MODEL = "google/siglip-base-patch16-224"
SOURCE_ENV_VAR = "SIGLIP_MODEL"
# SigLIP was trained on texts padded to exactly 64 tokens and pools the last
# position, so every text is padded (and truncated) to this length.
TEXT_MAX_LENGTH = 64

_WHITE = (255, 255, 255, 255)
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


class ModelNotAvailable(RuntimeError):
    """The SigLIP checkpoint could not be found or loaded."""

    def __init__(self, source: str, reason: str):
        self.source = source
        self.reason = reason.rstrip(". ")
        super().__init__(
            f"SigLIP model {source!r} is not available: {self.reason}. "
            f"Set the {SOURCE_ENV_VAR} environment variable to a local checkpoint "
            "directory or to a Hugging Face hub id that can be reached."
        )


def model_source_from_env(default: str = DEFAULT_MODEL) -> str:
    """The checkpoint named by ``$SIGLIP_MODEL``, or ``default``."""
    value = os.environ.get(SOURCE_ENV_VAR, "").strip()
    return value or default


# --------------------------------------------------------------------------
# Image decoding
# --------------------------------------------------------------------------


def _open(source) -> Image.Image:
    if isinstance(source, (bytes, bytearray, memoryview)):
        if not len(source):
            raise ValueError("cannot decode image: the data is empty")
        return Image.open(io.BytesIO(bytes(source)))
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as fh:
            data = fh.read()
        if not data:
            raise ValueError(f"cannot decode image: {os.fspath(source)!r} is empty")
        return Image.open(io.BytesIO(data))
    if hasattr(source, "read"):
        return Image.open(source)
    raise TypeError(
        f"expected image bytes, a path, a binary file object or a PIL image, got {type(source).__name__}"
    )


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    """Scale 16-bit (or 32-bit integer / float) greyscale down to 8 bits.

    Pillow's own conversion clips such values at 255, which turns most
    16-bit images white.
    """
    values = np.asarray(image)
    if image.mode == "F":
        values = values.astype(np.float64)
        finite = values[np.isfinite(values)]
        peak = float(finite.max()) if finite.size else 0.0
        scale = 255.0 if peak <= 1.0 else 1.0
        values = np.nan_to_num(values, nan=0.0, posinf=255.0 / scale, neginf=0.0) * scale
    else:
        values = values.astype(np.float64)
        if image.mode in _SIXTEEN_BIT_MODES or values.max(initial=0) > 255:
            values = np.clip(values, 0, 65535) / 257.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    profile = image.info.get("icc_profile")
    if profile:
        try:
            from PIL import ImageCms

            converted = ImageCms.profileToProfile(
                image,
                ImageCms.ImageCmsProfile(io.BytesIO(profile)),
                ImageCms.createProfile("sRGB"),
                outputMode="RGB",
            )
            if converted is not None:
                return converted
        except Exception:  # a broken or unsupported profile: fall back below
            logger.debug("ignoring unusable ICC profile on a CMYK image", exc_info=True)
    return image.convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a decoded image of any mode to RGB.

    Transparency (an alpha band or a ``transparency`` entry, as in palette or
    tRNS images) is composited on white; 16-bit greyscale is scaled to 8 bits;
    CMYK uses the embedded ICC profile when there is one.
    """
    mode = image.mode
    if mode == "RGB" and image.info.get("transparency") is None:
        return image
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        return _sixteen_bit_to_l(image).convert("RGB")
    bands = image.getbands()
    if "A" in bands or "a" in bands or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE)
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "CMYK":
        return _cmyk_to_rgb(image)
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise ValueError(f"cannot convert an image in mode {mode!r} to RGB") from exc


def load_image(source) -> Image.Image:
    """Decode ``source`` (bytes, a path, a binary file object or a PIL image)
    into an RGB :class:`PIL.Image.Image`.

    EXIF orientation is applied and only the first frame of animated images is
    kept.  Raises :class:`ValueError` when the data cannot be decoded.
    """
    if isinstance(source, Image.Image):
        image = source
    else:
        try:
            image = _open(source)
        except UnidentifiedImageError as exc:
            raise ValueError("cannot decode image: the data is not in a recognised image format") from exc
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            raise
        except Image.DecompressionBombError as exc:
            raise ValueError(f"cannot decode image: {exc}") from exc
        except (OSError, SyntaxError, EOFError) as exc:
            raise ValueError(f"cannot decode image: {exc}") from exc
    try:
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)
        image.load()
    except Image.DecompressionBombError as exc:
        raise ValueError(f"cannot decode image: {exc}") from exc
    except (OSError, SyntaxError, EOFError, ValueError) as exc:
        raise ValueError(f"cannot decode image: the data is truncated or corrupt ({exc})") from exc
    if image.width < 1 or image.height < 1:
        raise ValueError("cannot decode image: it has no pixels")
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # malformed EXIF must not make an image unusable
        logger.debug("ignoring unreadable EXIF orientation", exc_info=True)
    return to_rgb(image)


# --------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ImagePreprocessor:
    """SigLIP image preprocessing with Pillow and NumPy.

    Resize to ``height`` x ``width`` with ``resample``, rescale by
    ``rescale_factor`` and normalise with ``image_mean`` / ``image_std``,
    giving channels-first float32 arrays.  The arithmetic follows
    transformers' PIL-backend SigLIP image processor step by step (rescale in
    float64, then float32 normalisation), so the outputs agree with it.
    """

    height: int = 224
    width: int = 224
    resample: int = int(Image.Resampling.BICUBIC)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    @classmethod
    def from_image_processor(cls, processor, default_size: int | None = None) -> ImagePreprocessor:
        """Read the settings of a transformers image processor."""
        size = getattr(processor, "size", None)
        height = _size_value(size, "height")
        width = _size_value(size, "width")
        if not (height and width):
            if default_size is None:
                raise ValueError(f"the preprocessing config has no height/width size: {size!r}")
            height = width = default_size
        resample = getattr(processor, "resample", None)
        resample = int(Image.Resampling.BICUBIC) if resample is None else int(resample)
        mean = getattr(processor, "image_mean", None) or cls.image_mean
        std = getattr(processor, "image_std", None) or cls.image_std
        if isinstance(mean, (int, float)):
            mean = [mean] * 3
        if isinstance(std, (int, float)):
            std = [std] * 3
        return cls(
            height=int(height),
            width=int(width),
            resample=resample,
            do_rescale=bool(getattr(processor, "do_rescale", True)),
            rescale_factor=float(getattr(processor, "rescale_factor", None) or 1 / 255),
            do_normalize=bool(getattr(processor, "do_normalize", True)),
            image_mean=tuple(float(v) for v in mean),
            image_std=tuple(float(v) for v in std),
        )

    @classmethod
    def from_pretrained(cls, source: str, default_size: int | None = None) -> ImagePreprocessor:
        """Read the preprocessing config of a hub id or local checkpoint."""
        from transformers import AutoImageProcessor

        return cls.from_image_processor(AutoImageProcessor.from_pretrained(source), default_size)

    def process_one(self, image) -> np.ndarray:
        """One image (anything :func:`load_image` accepts) -> (3, H, W) float32."""
        rgb = load_image(image)
        if rgb.size != (self.width, self.height):
            rgb = rgb.resize((self.width, self.height), resample=self.resample)
        pixels = np.asarray(rgb)
        if self.do_rescale:
            pixels = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            pixels = pixels.astype(np.float32)
        if self.do_normalize:
            mean = np.asarray(self.image_mean, dtype=np.float32)
            std = np.asarray(self.image_std, dtype=np.float32)
            pixels = (pixels - mean) / std
        return np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32)

    def __call__(self, images: Iterable) -> np.ndarray:
        """Images -> (N, 3, H, W) float32."""
        arrays = [self.process_one(image) for image in images]
        if not arrays:
            return np.zeros((0, 3, self.height, self.width), dtype=np.float32)
        return np.stack(arrays)


def _size_value(size, key: str):
    if size is None:
        return None
    if isinstance(size, dict):
        return size.get(key)
    return getattr(size, key, None)


# --------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_device() -> str:
    """The device an encoder runs on when none is given: ``cuda`` when available, else ``cpu``."""
    return _default_device()


def _looks_like_path(source: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else is meant as a path.
    return (
        os.path.isabs(source)
        or source.startswith((".", "~"))
        or source.count("/") > 1
        or "\\" in source
    )


def _short_reason(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0].strip().rstrip(".") if text else ""
    if len(line) > 300:
        line = line[:297] + "..."
    name = type(exc).__name__
    return f"{name}: {line}" if line else name


def _as_text_list(texts) -> list[str]:
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be a list of strings, not a single string")
    texts = list(texts)
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"texts must be strings, got {type(text).__name__}")
    return texts


def _checkpoint_directory(source: str) -> str:
    """The local folder holding a checkpoint's config and weights; for a hub
    id, its cached snapshot (the weights are fetched when missing)."""
    if os.path.isdir(source):
        directory = source
    else:
        import json

        from transformers.utils import cached_file

        directory = None
        try:
            for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
                path = cached_file(source, name, _raise_exceptions_for_missing_entries=False)
                if path:
                    directory = os.path.dirname(path)
                    if name.endswith(".index.json"):
                        with open(path, encoding="utf-8") as fh:
                            shards = sorted(set(json.load(fh)["weight_map"].values()))
                        for shard in shards:
                            cached_file(source, shard)
                    break
        except Exception as exc:
            raise ModelNotAvailable(source, _short_reason(exc)) from exc
        if directory is None:
            raise ModelNotAvailable(source, "the checkpoint has no model weights")
    names = os.listdir(directory)
    if not any(name.endswith((".safetensors", ".bin")) for name in names):
        raise ModelNotAvailable(source, f"no model weights in {directory}")
    return directory


class SiglipEncoder:
    """Encode images and texts with a SigLIP checkpoint.

    ``source`` is a hub id (e.g. ``google/siglip-base-patch16-224``) or a local
    checkpoint directory.  Nothing is loaded until :meth:`load` (called
    implicitly by the encoding methods).  With the ``torch`` backend (the
    default here) the model runs in bfloat16 on CUDA and in float32 on CPU;
    ``backend`` may name another one of :data:`embeddings.core.inference.BACKENDS`
    or ``"auto"`` (the fastest for the device).  ONNX backends keep their
    exports in ``onnx_cache_dir``.  Outputs are always float32, L2-normalised.
    """

    def __init__(self, source: str, device: str | None = None, backend: str | None = "torch",
                 onnx_cache_dir=None, threads: int | None = None):
        from embeddings.core import inference

        self.source = str(source)
        self.device = str(device) if device else _default_device()
        self.backend = inference.resolve_backend(backend, self.device)
        self.onnx_cache_dir = onnx_cache_dir
        self.threads = threads
        self._lock = threading.Lock()
        self._model = None
        self._towers = None
        self._tokenizer = None
        self._dtype = None
        self._config = None
        self._resolved_source: str | None = None
        self.preprocessor: ImagePreprocessor | None = None
        self.dim: int | None = None
        self.image_size: int | None = None

    def __repr__(self) -> str:
        state = "loaded" if self.is_loaded else "not loaded"
        return f"<SiglipEncoder {self.source!r} on {self.device} via {self.backend} ({state})>"

    @property
    def is_loaded(self) -> bool:
        return self._towers is not None

    @property
    def model(self):
        """The underlying float ``SiglipModel`` (loads it if needed; with an
        ONNX backend it is only read from disk when asked for)."""
        self.load()
        if self._model is None:
            with self._lock:
                if self._model is None:
                    self._model = self._load_model()
        return self._model

    @property
    def tokenizer(self):
        """The checkpoint's tokenizer (loads the encoder if needed)."""
        self.load()
        return self._tokenizer

    # -- loading -----------------------------------------------------------

    def load(self) -> SiglipEncoder:
        """Load tokenizer, preprocessing config and the backend's towers once;
        thread-safe.  ONNX towers are exported and opened on first use."""
        if self._towers is not None:
            return self
        with self._lock:
            if self._towers is None:
                self._load_locked()
        return self

    def _resolve_source(self) -> str:
        source = self.source.strip()
        if not source:
            raise ModelNotAvailable(self.source, "no model source was given")
        expanded = os.path.expanduser(source)
        if os.path.isdir(expanded):
            return expanded
        if _looks_like_path(source):
            raise ModelNotAvailable(self.source, "the directory does not exist")
        return source

    def _load_locked(self) -> None:
        import torch
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

        from embeddings.core import inference

        source = self._resolve_source()
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        try:
            config = AutoConfig.from_pretrained(source)
        except Exception as exc:
            raise ModelNotAvailable(self.source, _short_reason(exc)) from exc
        if getattr(config, "model_type", None) != "siglip":
            raise ModelNotAvailable(
                self.source,
                f"it is a {getattr(config, 'model_type', 'unknown')!r} checkpoint, not a SigLIP one",
            )
        if not getattr(config.vision_config, "vision_use_head", True):
            raise ModelNotAvailable(self.source, "the checkpoint has no vision pooling head")
        vision_size = config.vision_config.image_size
        if isinstance(vision_size, (list, tuple)):
            vision_size = vision_size[0]
        vision_size = int(vision_size)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            processor = AutoImageProcessor.from_pretrained(source)
            preprocessor = ImagePreprocessor.from_image_processor(processor, default_size=vision_size)
        except Exception as exc:
            raise ModelNotAvailable(self.source, _short_reason(exc)) from exc
        if (preprocessor.height, preprocessor.width) != (vision_size, vision_size):
            raise ModelNotAvailable(
                self.source,
                f"its preprocessing size {preprocessor.height}x{preprocessor.width} does not match "
                f"the model's image size {vision_size}",
            )
        self._resolved_source = source
        self._config = config
        self._dtype = dtype
        model = None
        if self.backend in ("torch", "torch-int8"):
            model = self._load_model()
            towers = inference.torch_towers(model, self.backend, self.device, dtype)
        else:
            towers = inference.onnx_towers(
                _checkpoint_directory(source), self.backend, self._export_model,
                cache_dir=self.onnx_cache_dir, threads=self.threads,
            )

        self._tokenizer = tokenizer
        self.preprocessor = preprocessor
        self.image_size = preprocessor.height
        self.dim = int(config.vision_config.hidden_size)
        self._model = model
        self._towers = towers  # set last: marks the encoder as loaded
        logger.info(
            "loaded SigLIP %s on %s (%s, %s, dim %d, image size %d)",
            self.source, self.device, self.backend, str(dtype).replace("torch.", ""), self.dim, self.image_size,
        )

    def _load_model(self, *, for_export: bool = False):
        """The checkpoint's ``SiglipModel``: on this encoder's device and dtype,
        or (``for_export``) a float32 CPU copy with eager attention."""
        import torch
        from transformers import SiglipModel

        if for_export:
            options = {"config": copy.deepcopy(self._config), "dtype": torch.float32,
                       "attn_implementation": "eager"}
            device = "cpu"
        else:
            options = {"config": self._config, "dtype": self._dtype}
            device = self.device
        try:
            model = SiglipModel.from_pretrained(self._resolved_source, **options)
        except Exception as exc:
            raise ModelNotAvailable(self.source, _short_reason(exc)) from exc
        model.to(device)
        model.eval()
        return model

    def _export_model(self):
        return self._load_model(for_export=True)

    # -- preprocessing -----------------------------------------------------

    def preprocess(self, images: Sequence) -> np.ndarray:
        """Images (bytes, paths, file objects or PIL images) -> (N, 3, H, W)
        float32 pixel values for this checkpoint."""
        self.load()
        return self.preprocessor(images)

    def tokenize(self, texts: Sequence[str]):
        """Texts -> ``{"input_ids": LongTensor (N, 64)}``.

        Padded to exactly :data:`TEXT_MAX_LENGTH` tokens.  No attention mask
        is returned: SigLIP was trained without one (the pad token is the EOS
        token and the last position is pooled).
        """
        import torch

        return {"input_ids": torch.from_numpy(self.token_ids(texts))}

    # -- encoding ----------------------------------------------------------

    def _empty(self) -> np.ndarray:
        return np.zeros((0, self.dim), dtype=np.float32)

    def token_ids(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> (N, 64) int64 token ids, padded like :meth:`tokenize`."""
        texts = _as_text_list(texts)
        # Lists, not return_tensors="np": the tokenizer's array conversion costs more
        # than the tokenizing of a short query (0.15 against 0.11 ms per call).
        encoded = self.tokenizer(
            texts,
            padding="max_length",
            max_length=TEXT_MAX_LENGTH,
            truncation=True,
        )
        return np.asarray(encoded["input_ids"], dtype=np.int64).reshape(len(texts), TEXT_MAX_LENGTH)

    def encode_pixels(self, pixel_values: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """(N, 3, H, W) pixel values -> (N, dim) float32 unit vectors."""
        self.load()
        pixel_values = np.asarray(pixel_values, dtype=np.float32)
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must have shape (N, 3, H, W), got {pixel_values.shape}")
        tower = self._towers["image"]
        return self._in_batches(pixel_values, batch_size, lambda part: tower(np.ascontiguousarray(part)))

    def logit_calibration(self) -> tuple[float, float]:
        """The checkpoint's sigmoid head: (scale, bias) with σ(scale · cosine + bias) the
        probability that a text and an image match (scale is ``exp(logit_scale)``)."""
        model = self.model
        return float(model.logit_scale.detach().float().exp()), float(model.logit_bias.detach().float())

    def encode_device_pixels(self, pixels) -> np.ndarray:
        """A batch of normalised pixels already on the model's device (a torch tensor in its
        dtype, as the bulk pipeline prepares them on a GPU) -> (N, dim) float32 unit vectors."""
        import torch

        self.load()
        with torch.inference_mode():
            features = self.model.get_image_features(pixel_values=pixels).pooler_output
            features = torch.nn.functional.normalize(features.float(), p=2, dim=-1)
        return features.cpu().numpy().astype(np.float32, copy=False)

    def encode_images(self, images: Sequence, batch_size: int = 32) -> np.ndarray:
        """Images (bytes, paths, file objects or PIL images) -> (N, dim)
        float32 unit vectors."""
        self.load()
        return self._in_batches(list(images), batch_size,
                                lambda part: self.encode_pixels(self.preprocessor(part), batch_size))

    def encode_token_ids(self, input_ids: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """(N, 64) token ids (as from :meth:`tokenize`) -> (N, dim) float32 unit vectors."""
        self.load()
        input_ids = np.asarray(input_ids, dtype=np.int64)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (N, length), got {input_ids.shape}")
        tower = self._towers["text"]
        return self._in_batches(input_ids, batch_size, lambda part: tower(np.ascontiguousarray(part)))

    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Texts -> (N, dim) float32 unit vectors."""
        texts = _as_text_list(texts)
        self.load()
        return self._in_batches(texts, batch_size,
                                lambda part: self.encode_token_ids(self.token_ids(part), batch_size))

    def _in_batches(self, items, batch_size: int, encode) -> np.ndarray:
        """``encode`` over consecutive slices of at most ``batch_size`` items, stacked:
        (N, dim) float32 unit vectors; (0, dim) for no items."""
        if len(items) == 0:
            return self._empty()
        batch_size = max(1, int(batch_size))
        return np.concatenate([encode(items[start : start + batch_size])
                               for start in range(0, len(items), batch_size)])


_ENCODERS: dict[tuple, SiglipEncoder] = {}
_ENCODERS_LOCK = threading.Lock()


def get_encoder(source: str, device: str | None = None, backend: str | None = "torch",
                onnx_cache_dir=None) -> SiglipEncoder:
    """The process-wide encoder for ``(source, device, backend)``; created on
    first use and loaded lazily, so each process loads a given model at most
    once per backend.  ``backend`` ``"auto"`` resolves per device (see
    :func:`embeddings.core.inference.default_backend`)."""
    from embeddings.core import inference

    device = str(device) if device else _default_device()
    resolved = inference.resolve_backend(backend, device)
    key = (str(source), device) if resolved == "torch" else (str(source), device, resolved)
    with _ENCODERS_LOCK:
        encoder = _ENCODERS.get(key)
        if encoder is None:
            encoder = _ENCODERS[key] = SiglipEncoder(
                key[0], device, backend=resolved, onnx_cache_dir=onnx_cache_dir
            )
        return encoder


def clear_encoder_cache() -> None:
    """Forget the encoders kept by :func:`get_encoder`."""
    with _ENCODERS_LOCK:
        _ENCODERS.clear()
