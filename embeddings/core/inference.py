"""Inference backends for SigLIP's text and image towers.

A backend turns the towers of a checkpoint into two callables, ``text`` and
``image``, each mapping a NumPy batch (token ids ``(N, 64)`` int64, or pixel
values ``(N, 3, H, W)`` float32) to L2-normalised float32 embeddings ``(N, D)``.

=============  ==================================================================
``torch``      the transformers model as loaded: float32 on CPU, bfloat16 on CUDA
``torch-int8`` torch dynamic int8 quantisation of every ``nn.Linear`` (CPU only)
``onnx``       each tower exported to ONNX once and run by ONNX Runtime (CPU), fp32
``onnx-int8``  the same export with the weights of its MatMuls quantised to int8
               (dynamic quantisation: activations are quantised per call, the
               int8 products are accumulated in int32)
``auto``       ``torch`` on CUDA, ``onnx-int8`` on CPU (:func:`default_backend`)
=============  ==================================================================

ONNX exports are written once per checkpoint into a cache folder, keyed by a
hash of the checkpoint's config and weights (:func:`checkpoint_fingerprint`),
under a file lock so that several processes starting together export once.

On CUDA a single text query replays a captured CUDA graph
(``$SIGLIP_CUDA_GRAPHS=0`` turns that off; see :class:`TorchTower`).

Threads: ONNX Runtime sessions use ``$SIGLIP_THREADS`` intra-op threads
(default :func:`default_threads`) and never spin between calls, so idle web
processes leave the cores to the busy one.

This module does not import Django.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "AUTO",
    "BACKENDS",
    "CACHE_ENV_VAR",
    "CUDA_GRAPHS_ENV_VAR",
    "EXPORT_FORMAT",
    "THREADS_ENV_VAR",
    "OnnxTower",
    "TorchTower",
    "checkpoint_fingerprint",
    "cpu_has_vnni",
    "cuda_graphs_enabled",
    "default_backend",
    "default_cache_dir",
    "default_threads",
    "ensure_onnx_export",
    "export_tower",
    "onnx_towers",
    "quantize_int8",
    "resolve_backend",
    "torch_towers",
]

AUTO = "auto"
BACKENDS = ("torch", "torch-int8", "onnx", "onnx-int8")
CPU_ONLY_BACKENDS = ("torch-int8", "onnx", "onnx-int8")
CACHE_ENV_VAR = "SIGLIP_ONNX_CACHE"
THREADS_ENV_VAR = "SIGLIP_THREADS"
TOWERS = ("text", "image")
# Bumped whenever the exported graph changes, so old cache entries are not reused.
EXPORT_FORMAT = 2
ONNX_OPSET = 17
_INPUT_NAMES = {"text": "input_ids", "image": "pixel_values"}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


# --------------------------------------------------------------------------
# Choosing a backend
# --------------------------------------------------------------------------


def default_backend(device: str) -> str:
    """The fastest backend that keeps fp32 quality on ``device``.

    CUDA: ``torch`` (bfloat16). CPU: ``onnx-int8`` (see docs/performance.md
    for the measurements behind it).
    """
    return "torch" if str(device).startswith("cuda") else "onnx-int8"


def resolve_backend(name: str | None, device: str) -> str:
    """Validate a backend name for ``device``; ``None``, ``""`` and ``"auto"``
    give :func:`default_backend`."""
    value = (name or AUTO).strip().lower()
    if value == AUTO:
        return default_backend(device)
    if value not in BACKENDS:
        raise ValueError(
            f"unknown SigLIP inference backend {name!r}; choose one of {', '.join((AUTO,) + BACKENDS)}"
        )
    if value in CPU_ONLY_BACKENDS and not str(device).startswith("cpu"):
        raise ValueError(f"the {value!r} inference backend runs on the CPU only, not on {device!r}")
    return value


def default_threads() -> int:
    """Intra-op threads per ONNX Runtime session: ``$SIGLIP_THREADS``, else
    the number of cores this process may use, at most 4."""
    value = os.environ.get(THREADS_ENV_VAR, "").strip()
    if value:
        threads = int(value)
        if threads < 1:
            raise ValueError(f"{THREADS_ENV_VAR} must be at least 1, got {value!r}")
        return threads
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


def default_cache_dir() -> Path:
    """``$SIGLIP_ONNX_CACHE``, else ``~/.cache/siglip-onnx``."""
    value = os.environ.get(CACHE_ENV_VAR, "").strip()
    return Path(value).expanduser() if value else Path.home() / ".cache" / "siglip-onnx"


def cpu_has_vnni() -> bool:
    """Whether the CPU has 8-bit dot-product instructions (AVX-VNNI,
    AVX512-VNNI or AMX-INT8).

    Without them ONNX Runtime multiplies unsigned by signed bytes with an
    instruction whose 16-bit intermediate sums can saturate, so weights are
    then quantised to 7 bits (``reduce_range``). Unknown CPUs count as
    without.
    """
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx_vnni", "avx512_vnni", "amx_int8"})
    except OSError:
        pass
    return False


# --------------------------------------------------------------------------
# Torch backends
# --------------------------------------------------------------------------


CUDA_GRAPHS_ENV_VAR = "SIGLIP_CUDA_GRAPHS"


def cuda_graphs_enabled() -> bool:
    """Whether single text queries on CUDA replay a captured CUDA graph
    (``$SIGLIP_CUDA_GRAPHS``, default on)."""
    return os.environ.get(CUDA_GRAPHS_ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


class TorchTower:
    """One tower of a (possibly quantised) ``SiglipModel`` run by torch.

    On CUDA, a text tower answers one-query batches (the search path) by
    replaying a CUDA graph captured on first use: the ~200 kernels of the
    12-layer tower are launched by one call instead of one Python call each,
    which is most of a single query's time on a GPU. Other batch sizes, and
    any failure to capture, run eagerly.
    """

    def __init__(self, model, tower: str, device: str, dtype, one_at_a_time: bool = False,
                 cuda_graph: bool | None = None):
        if tower not in TOWERS:
            raise ValueError(f"unknown tower {tower!r}")
        self.model = model
        self.tower = tower
        self.device = device
        self.dtype = dtype
        # Dynamic quantisation scales each call's activations together (see OnnxTower).
        self.one_at_a_time = bool(one_at_a_time)
        if cuda_graph is None:
            cuda_graph = cuda_graphs_enabled()
        self.cuda_graph = bool(cuda_graph) and tower == "text" and str(device).startswith("cuda")
        self._graph = None  # (graph, static input, static output) once captured; False if it failed
        self._graph_lock = threading.Lock()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self.cuda_graph and len(batch) == 1 and self._graph is not False:
            out = self._replay(batch)
            if out is not None:
                return out
        if self.one_at_a_time and len(batch) > 1:
            return np.concatenate([self._run(batch[i : i + 1]) for i in range(len(batch))])
        return self._run(batch)

    def _forward(self, inputs):
        import torch

        if self.tower == "text":
            features = self.model.get_text_features(input_ids=inputs).pooler_output
        else:
            features = self.model.get_image_features(pixel_values=inputs).pooler_output
        return torch.nn.functional.normalize(features.float(), p=2, dim=-1)

    def _replay(self, batch: np.ndarray) -> np.ndarray | None:
        import torch

        with self._graph_lock:  # one set of static buffers: one query at a time
            if self._graph is None:
                self._graph = self._capture(batch.shape)
                if self._graph is False:
                    return None
            graph, static_in, static_out = self._graph
            if tuple(batch.shape) != tuple(static_in.shape):
                return None
            with torch.inference_mode():
                static_in.copy_(torch.from_numpy(np.ascontiguousarray(batch)), non_blocking=False)
                graph.replay()
                return static_out.cpu().numpy()  # a host copy: the static buffer is not shared

    def _capture(self, shape):
        import torch

        try:
            with torch.inference_mode():
                static_in = torch.zeros(tuple(shape), dtype=torch.long, device=self.device)
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(3):  # warm up (allocator, kernels) outside the graph
                        self._forward(static_in)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    static_out = self._forward(static_in)
                torch.cuda.synchronize()
            logger.info("text tower: CUDA graph captured for batches of shape %s", tuple(shape))
            return graph, static_in, static_out
        except Exception as exc:  # noqa: BLE001 - any capture failure means: run eagerly
            logger.warning("text tower: CUDA graph capture failed, running eagerly (%s)", exc)
            return False

    def _run(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            inputs = torch.from_numpy(np.ascontiguousarray(batch))
            if self.tower == "text":
                inputs = inputs.to(self.device)
            else:
                inputs = inputs.to(device=self.device, dtype=self.dtype)
            return self._forward(inputs).cpu().numpy().astype(np.float32, copy=False)


def _quantize_linear_int8(model):
    import torch

    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao, which is not
        # a dependency here; the eager dynamic quantisation still works.
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8
        ).eval()


def torch_towers(model, backend: str, device: str, dtype) -> dict[str, Callable]:
    """``{"text": ..., "image": ...}`` running ``model`` (``torch``) or an int8
    copy of it (``torch-int8``; the given model is left untouched)."""
    if backend == "torch-int8":
        model = _quantize_linear_int8(model)
    elif backend != "torch":
        raise ValueError(f"not a torch backend: {backend!r}")
    one = backend == "torch-int8"
    return {tower: TorchTower(model, tower, device, dtype, one_at_a_time=one) for tower in TOWERS}


# --------------------------------------------------------------------------
# ONNX export
# --------------------------------------------------------------------------


def _tower_module(model, tower: str):
    """A module mapping a tower's input to unit-length embeddings."""
    import torch

    class TextTower(torch.nn.Module):
        """SigLIP's text transformer, computing in its last layer only what the
        pooled (last) position needs: keys and values of every position, but
        the query, attention output, MLP and final LayerNorm of that one
        position. The result is the model's ``pooler_output``; about 7 % of
        the tower's multiply-adds are skipped."""

        def __init__(self):
            super().__init__()
            self.text = model.text_model

        def forward(self, input_ids):
            text = self.text
            hidden = text.embeddings(input_ids=input_ids)
            layers = text.encoder.layers
            for layer in layers[:-1]:
                hidden = layer(hidden, None)
            last = layers[-1]
            attention = last.self_attn
            batch = hidden.shape[0]
            heads, width = attention.num_heads, attention.head_dim
            normed = last.layer_norm1(hidden)
            query = attention.q_proj(normed[:, -1:, :]).reshape(batch, 1, heads, width).transpose(1, 2)
            keys = attention.k_proj(normed).reshape(batch, -1, heads, width).transpose(1, 2)
            values = attention.v_proj(normed).reshape(batch, -1, heads, width).transpose(1, 2)
            weights = torch.softmax(torch.matmul(query, keys.transpose(-1, -2)) * attention.scale, dim=-1)
            mixed = torch.matmul(weights, values).transpose(1, 2).reshape(batch, 1, heads * width)
            pooled = hidden[:, -1:, :] + attention.out_proj(mixed)
            pooled = pooled + last.mlp(last.layer_norm2(pooled))
            features = text.head(text.final_layer_norm(pooled[:, 0, :]))
            return torch.nn.functional.normalize(features, p=2, dim=-1)

    class ImageTower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            features = self.model.get_image_features(pixel_values=pixel_values).pooler_output
            return torch.nn.functional.normalize(features, p=2, dim=-1)

    return (TextTower if tower == "text" else ImageTower)().eval()


def _example_input(model, tower: str):
    import torch

    if tower == "text":
        length = int(model.config.text_config.max_position_embeddings)
        return torch.ones((2, length), dtype=torch.int64)
    vision = model.config.vision_config
    size = vision.image_size if not isinstance(vision.image_size, (list, tuple)) else vision.image_size[0]
    return torch.zeros((2, int(vision.num_channels), int(size), int(size)), dtype=torch.float32)


def export_tower(model, tower: str, path) -> Path:
    """Export one tower of a float32 CPU ``SiglipModel`` to ``path`` (ONNX,
    dynamic batch axis, normalised output named ``embeddings``).

    Uses the TorchScript-based exporter: it handles the model as transformers
    writes it (eager attention) in seconds, and ONNX Runtime fuses the
    resulting attention, LayerNorm and GELU patterns itself.
    """
    import torch

    if tower not in TOWERS:
        raise ValueError(f"unknown tower {tower!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    input_name = _INPUT_NAMES[tower]
    module = _tower_module(model, tower)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and deprecation notices
        torch.onnx.export(
            module,
            (_example_input(model, tower),),
            str(path),
            dynamo=False,
            input_names=[input_name],
            output_names=["embeddings"],
            dynamic_axes={input_name: {0: "batch"}, "embeddings": {0: "batch"}},
            opset_version=ONNX_OPSET,
            do_constant_folding=True,
        )
    return path


def quantize_int8(source, target, *, reduce_range: bool | None = None) -> Path:
    """Dynamic int8 quantisation of the MatMul weights of an ONNX model.

    Only MatMuls with a constant (weight) operand are quantised, per output
    channel; attention products, LayerNorms, GELUs and the embedding tables
    stay float32. ``reduce_range`` (7-bit weights) defaults to ``True`` on
    CPUs without VNNI (:func:`cpu_has_vnni`).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if reduce_range is None:
        reduce_range = not cpu_has_vnni()
    source, target = Path(source), Path(target)
    large = sum(f.stat().st_size for f in source.parent.iterdir() if f.is_file()) > 1_800_000_000
    with _quiet_logging():
        quantize_dynamic(
            source,
            target,
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            reduce_range=bool(reduce_range),
            weight_type=QuantType.QInt8,
            use_external_data_format=large,
            extra_options={"MatMulConstBOnly": True},
        )
    return target


@contextlib.contextmanager
def _quiet_logging():
    # The quantiser logs a generic "consider pre-processing" warning on the root logger.
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


# --------------------------------------------------------------------------
# Cache of exports
# --------------------------------------------------------------------------


def _weight_files(directory: Path) -> list[Path]:
    files = [p for p in directory.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES)]
    # A *.safetensors index names the shards; both kinds of file are covered above.
    return sorted(files, key=lambda p: p.name)


_FINGERPRINTS: dict[tuple, str] = {}
_FINGERPRINTS_LOCK = threading.Lock()


def _file_digest(path: Path) -> str:
    real = path.resolve()
    stat = real.stat()
    key = (str(real), stat.st_size, stat.st_mtime_ns)
    with _FINGERPRINTS_LOCK:
        cached = _FINGERPRINTS.get(key)
    if cached is None:
        digest = hashlib.sha256()
        with open(real, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
        cached = digest.hexdigest()
        with _FINGERPRINTS_LOCK:
            _FINGERPRINTS[key] = cached
    return cached


def checkpoint_fingerprint(directory, *, memo_dir=None) -> str:
    """sha256 over a checkpoint's ``config.json`` and weight files.

    Hashing the weights of a base model takes about a second; with
    ``memo_dir`` the digest of each file is remembered there (keyed by its
    real path, size and modification time), so later processes skip it.
    """
    directory = Path(directory)
    config = directory / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{directory} has no config.json")
    weights = _weight_files(directory)
    if not weights:
        raise FileNotFoundError(f"{directory} has no weight files")
    memo = _load_memo(memo_dir)
    outer = hashlib.sha256()
    outer.update(b"siglip-checkpoint\0")
    outer.update(hashlib.sha256(config.read_bytes()).hexdigest().encode())
    changed = False
    for path in weights:
        real = path.resolve()
        stat = real.stat()
        key = f"{real}|{stat.st_size}|{stat.st_mtime_ns}"
        digest = memo.get(key)
        if digest is None:
            digest = memo[key] = _file_digest(path)
            changed = True
        outer.update(f"\0{path.name}\0{digest}".encode())
    if changed and memo_dir is not None:
        _save_memo(memo_dir, memo)
    return outer.hexdigest()


def _memo_path(memo_dir) -> Path:
    return Path(memo_dir) / "file-digests.json"


def _load_memo(memo_dir) -> dict:
    if memo_dir is None:
        return {}
    try:
        return dict(json.loads(_memo_path(memo_dir).read_text()))
    except (OSError, ValueError, TypeError):
        return {}


def _save_memo(memo_dir, memo: dict) -> None:
    path = _memo_path(memo_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
        tmp.write_text(json.dumps(memo, indent=0, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        logger.debug("could not remember checkpoint digests in %s", path, exc_info=True)


@contextlib.contextmanager
def _file_lock(path: Path):
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


_PROCESS_LOCK = threading.Lock()


def _variant(backend: str) -> str:
    if backend == "onnx":
        return "fp32"
    if backend == "onnx-int8":
        return "int8" if cpu_has_vnni() else "int8-rr"
    raise ValueError(f"not an ONNX backend: {backend!r}")


def ensure_onnx_export(
    checkpoint_dir,
    tower: str,
    backend: str,
    load_model: Callable[[], object],
    cache_dir=None,
) -> Path:
    """The ONNX file of one tower for ``backend`` (``onnx`` or ``onnx-int8``),
    exporting (and quantising) it first when the cache does not hold it.

    ``load_model`` returns a float32 CPU ``SiglipModel`` with eager attention;
    it is called only when an export is needed. Files live in
    ``cache_dir/<fingerprint>/<tower>-<variant>-f<EXPORT_FORMAT>/model.onnx``
    and are renamed into place complete, so readers never see half a file.
    """
    if tower not in TOWERS:
        raise ValueError(f"unknown tower {tower!r}")
    variant = _variant(backend)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    fingerprint = checkpoint_fingerprint(checkpoint_dir, memo_dir=cache_dir)
    root = cache_dir / fingerprint[:32]
    final = root / f"{tower}-{variant}-f{EXPORT_FORMAT}" / "model.onnx"
    if final.is_file():
        return final
    with _PROCESS_LOCK, _file_lock(root / ".lock"):
        if final.is_file():
            return final
        started = time.monotonic()
        fp32 = root / f"{tower}-fp32-f{EXPORT_FORMAT}" / "model.onnx"
        model = None
        exported_here = not fp32.is_file()
        if exported_here:
            model = load_model()
            _build_into(fp32.parent, lambda d: export_tower(model, tower, d / "model.onnx"))
        if variant != "fp32":
            _build_into(
                final.parent,
                lambda d: quantize_int8(fp32, d / "model.onnx", reduce_range=variant == "int8-rr"),
            )
            if exported_here:  # only a step towards the int8 file: do not keep ~0.4 GB per tower
                shutil.rmtree(fp32.parent, ignore_errors=True)
        (root / "source.json").write_text(
            json.dumps({"checkpoint": str(checkpoint_dir), "fingerprint": fingerprint}, indent=2)
        )
        logger.info(
            "exported the SigLIP %s tower of %s to %s in %.1f s",
            tower, checkpoint_dir, final, time.monotonic() - started,
        )
        del model
    return final


def _build_into(folder: Path, build: Callable[[Path], object]) -> None:
    """Run ``build`` in a scratch folder beside ``folder`` and rename it into place."""
    scratch = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        build(scratch)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(scratch, folder)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# --------------------------------------------------------------------------
# ONNX Runtime sessions
# --------------------------------------------------------------------------


class OnnxTower:
    """One exported tower run by ONNX Runtime on the CPU.

    Sessions are thread-safe; concurrent calls share its intra-op threads.
    With ``one_at_a_time`` each input runs alone: dynamic quantisation picks
    its activation scales per call, so in a batch one input's range would
    change another's embedding; alone, an embedding depends on its input only
    (and a stored vector equals the query vector of the same input).
    """

    def __init__(self, path, tower: str, threads: int | None = None, one_at_a_time: bool = False):
        import onnxruntime as ort

        self.path = Path(path)
        self.tower = tower
        self.one_at_a_time = bool(one_at_a_time)
        self.threads = int(threads) if threads else default_threads()
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning workers would burn the cores that other web processes,
        # PostgreSQL and FAISS need between two queries.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.dtype = np.int64 if tower == "text" else np.float32

    def __repr__(self) -> str:
        return f"<OnnxTower {self.tower} {self.path} threads={self.threads}>"

    def _run(self, batch: np.ndarray) -> np.ndarray:
        (embeddings,) = self.session.run(["embeddings"], {self.input_name: batch})
        return np.ascontiguousarray(embeddings, dtype=np.float32)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=self.dtype)
        if self.one_at_a_time and len(batch) > 1:
            return np.concatenate([self._run(batch[i : i + 1]) for i in range(len(batch))])
        return self._run(batch)


def onnx_towers(
    checkpoint_dir,
    backend: str,
    load_model: Callable[[], object],
    cache_dir=None,
    threads: int | None = None,
) -> dict[str, Callable]:
    """``{"text": ..., "image": ...}`` as ONNX Runtime sessions; each tower is
    exported (once per checkpoint) and opened when first called."""
    return {
        tower: _LazyOnnxTower(checkpoint_dir, tower, backend, load_model, cache_dir, threads)
        for tower in TOWERS
    }


class _LazyOnnxTower:
    def __init__(self, checkpoint_dir, tower, backend, load_model, cache_dir, threads):
        self._args = (checkpoint_dir, tower, backend, load_model, cache_dir)
        self._threads = threads
        self._lock = threading.Lock()
        self._tower: OnnxTower | None = None
        self.tower = tower

    def get(self) -> OnnxTower:
        if self._tower is None:
            with self._lock:
                if self._tower is None:
                    checkpoint_dir, tower, backend, load_model, cache_dir = self._args
                    path = ensure_onnx_export(checkpoint_dir, tower, backend, load_model, cache_dir)
                    self._tower = OnnxTower(path, tower, self._threads, one_at_a_time=backend == "onnx-int8")
        return self._tower

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.get()(batch)
