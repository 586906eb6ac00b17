"""The box frame `eval` and `export` use when no --codec is given: the model's family, by the rule
`train` uses; an explicit --codec wins; the choice is printed."""

from __future__ import annotations

import json

import apache_beam as beam
import pytest
from click.testing import CliRunner
from kvgbench import DEFAULT_CASES, write_kvg_bench
from samples import make_sample

from groundforge.annotators.teacher.types import TeacherReply
from groundforge.cli import main
from groundforge.outputs.export import choose_export_codec
from groundforge.outputs.shards import WriteShards, finalize_shards
from groundforge.schemas.codecs import get_codec
from groundforge.trainer import evaluate as evaluate_module
from groundforge.trainer.evaluate import choose_codec, load_kvg_bench

# The tiny Qwen2.5-VL's processor budget (tests/tinymodels.py).
TINY_BUDGET = {"max_pixels": 28 * 28 * 16, "min_pixels": 28 * 28 * 4}


@pytest.fixture(scope="module")
def bench_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "kvg-bench.parquet"
    write_kvg_bench(path, DEFAULT_CASES)
    return path


def config_only(folder, family: str):
    """A folder holding only the config.json of a model ``family`` (enough to read its type)."""
    import transformers

    getattr(transformers, family)().save_pretrained(folder)
    return str(folder)


class RenderedBackend:
    """Answers every item with its answer box rendered by ``codec``; records its arguments."""

    def __init__(self, bench_file, codec):
        self.texts = {
            item.question_id: codec.render(item.pixel_boxes()[0], item.width, item.height)
            for item in load_kvg_bench(bench_file)
        }
        self.kwargs = None

    def __call__(self, **kwargs):
        self.kwargs = kwargs
        return self

    def answer(self, requests):
        return [TeacherReply(r.item_id, text=self.texts[r.item_id]) for r in requests]


def run(args):
    result = CliRunner().invoke(main, args, terminal_width=200)
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def metrics(out_dir):
    return json.loads((out_dir / "metrics.json").read_text())


# -- eval --------------------------------------------------------------------------------------


def test_eval_of_a_qwen25vl_folder_reads_its_frame_by_default(tiny_vlm_dir, bench_file, tmp_path):
    out = tmp_path / "eval"
    args = ["eval", "--bench", str(bench_file), "--model", str(tiny_vlm_dir)]
    output = run([*args, "--max-tokens", "4", "--out", str(out)])
    line = "codec qwen25vl (min_pixels 3136, max_pixels 12544; from model type qwen2_5_vl)"
    assert f"{line}, scorer codec\n" in output
    config = metrics(out)["config"]
    assert (config["codec"], config["scorer"]) == ("qwen25vl", "codec")
    assert config["codec_params"] == TINY_BUDGET
    assert config["codec_source"] == "from model type qwen2_5_vl"


def test_the_derived_frame_is_the_one_the_replies_are_read_in(
    tiny_vlm_dir, bench_file, tmp_path, monkeypatch
):
    # Replies in the pixels of the tiny processor's resized image (112 x 84 for 280 x 224).
    backend = RenderedBackend(bench_file, get_codec("qwen25vl", **TINY_BUDGET))
    monkeypatch.setattr(evaluate_module, "make_backend", backend)
    args = ["eval", "--bench", str(bench_file), "--model", str(tiny_vlm_dir)]
    run([*args, "--out", str(tmp_path / "derived")])
    assert metrics(tmp_path / "derived")["grounding"]["all"]["acc"] == 100.0
    assert backend.kwargs["max_pixels"] is None  # the processor keeps its own budget

    output = run([*args, "--codec", "norm1000", "--out", str(tmp_path / "given")])
    assert "codec norm1000 (given), scorer codec\n" in output
    given = metrics(tmp_path / "given")
    assert given["config"]["codec"] == "norm1000"
    assert given["grounding"]["all"]["acc"] == 0.0


@pytest.mark.parametrize(
    ("family", "line"),
    [
        ("Qwen3VLConfig", "codec qwen3vl (from model type qwen3_vl), scorer codec"),
        ("Qwen2VLConfig", "codec norm1000 (from model type qwen2_vl), scorer kvgbench"),
        (
            "LlavaConfig",
            "codec norm1000 (the default: model type 'llava' has no known box frame), "
            "scorer kvgbench",
        ),
    ],
)
def test_eval_of_other_families(family, line, bench_file, tmp_path, monkeypatch):
    model = config_only(tmp_path / "model", family)
    codec = choose_codec(model)
    backend = RenderedBackend(bench_file, get_codec(codec.codec, **codec.params))
    monkeypatch.setattr(evaluate_module, "make_backend", backend)
    output = run(["eval", "--bench", str(bench_file), "--model", model, "--out", str(tmp_path)])
    assert f"{line}\n" in output
    assert metrics(tmp_path)["grounding"]["all"]["acc"] == 100.0


def test_eval_of_an_endpoint_says_its_default(bench_file, tmp_path, monkeypatch):
    backend = RenderedBackend(bench_file, get_codec("norm1000"))
    monkeypatch.setattr(evaluate_module, "make_backend", backend)
    endpoint = ["--endpoint", "http://127.0.0.1:1/v1", "--served-model", "m"]
    output = run(["eval", "--bench", str(bench_file), *endpoint])
    assert "codec norm1000 (the default for an endpoint; give --codec" in output
    assert "scorer kvgbench\n" in output
    output = run(["eval", "--bench", str(bench_file), *endpoint, "--codec", "qwen3vl"])
    assert "codec qwen3vl (given), scorer codec\n" in output


def test_choose_codec_rules(tiny_vlm_dir, tmp_path):
    qwen3 = config_only(tmp_path / "qwen3", "Qwen3VLConfig")
    # The published scorer reads 0..1000 whatever the model.
    assert choose_codec(tiny_vlm_dir, scorer="kvgbench").codec == "norm1000"
    assert choose_codec(qwen3, scorer="codec").codec == "qwen3vl"
    given = choose_codec(tiny_vlm_dir, codec="qwen25vl", codec_params={"max_pixels": 6272})
    assert given.params == {"max_pixels": 6272, "min_pixels": 3136}
    assert choose_codec(qwen3, codec="norm01", codec_params={"max_pixels": 6272}).params == {}
    with pytest.raises(ValueError, match="no model config"):
        choose_codec(tmp_path / "nothing")


def test_eval_max_pixels_of_an_endpoint_needs_qwen25vl(bench_file):
    endpoint = ["--endpoint", "http://127.0.0.1:1/v1", "--served-model", "m"]
    result = CliRunner().invoke(
        main, ["eval", "--bench", str(bench_file), *endpoint, "--max-pixels", "6272"]
    )
    assert result.exit_code == 1 and "qwen25vl frame or an in-process model" in result.output


# -- export ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "shards"
    with beam.Pipeline() as p:
        _ = p | beam.Create([make_sample(i, "sft") for i in range(3)]) | WriteShards(str(out))
    finalize_shards(str(out), ["sft"], "arrow")
    return out


def verl_truth(folder):
    import pyarrow.parquet as pq

    row = pq.read_table(folder / "sft.parquet").to_pylist()[0]
    return json.loads(row["reward_model"]["ground_truth"])


def test_export_with_a_model_uses_the_codec_train_uses(tiny_vlm_dir, shards, tmp_path):
    from groundforge.trainer.config import load_train_config
    from groundforge.trainer.sft import load_policy

    output = run(["export", "verl", str(shards), "--to", str(tmp_path), "--model", tiny_vlm_dir])
    assert (
        "codec qwen25vl (min_pixels 3136, max_pixels 401408; from model type qwen2_5_vl, "
        "as train derives it)\n"
    ) in output
    truth = verl_truth(tmp_path)
    exported = get_codec(truth["codec"], **truth["codec_params"])
    assert exported == load_policy(tiny_vlm_dir, load_train_config()).codec


def test_export_defaults_and_overrides(tiny_vlm_dir, shards, tmp_path):
    qwen3 = config_only(tmp_path / "qwen3", "Qwen3VLConfig")
    assert choose_export_codec(qwen3) == (
        "qwen3vl",
        {},
        "from model type qwen3_vl, as train derives it",
    )
    assert choose_export_codec() == ("qwen25vl", {}, "the default without a model")
    assert choose_export_codec(tiny_vlm_dir, max_pixels=6272)[1] == {
        "max_pixels": 6272,
        "min_pixels": 3136,
    }
    dest = tmp_path / "lf"
    args = ["export", "llamafactory", str(shards), "--to", str(dest)]
    assert "codec qwen25vl (the default without a model)\n" in run(args)
    output = run([*args, "--model", qwen3, "--codec", "pixel"])
    assert "codec pixel (given)\n" in output

    llava = config_only(tmp_path / "llava", "LlavaConfig")
    result = CliRunner().invoke(main, [*args, "--model", llava])
    assert result.exit_code == 2 and "no default box codec for model type 'llava'" in result.output
    assert "choose a codec with --codec" in result.output
    result = CliRunner().invoke(main, [*args, "--model", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "no model config to choose the box frame" in result.output
    result = CliRunner().invoke(main, [*args, "--codec", "norm1000", "--max-pixels", "6272"])
    assert result.exit_code == 2
    assert "--max-pixels applies to --codec qwen25vl only, not norm1000 (given)" in result.output
    result = CliRunner().invoke(main, [*args, "--model", qwen3, "--max-pixels", "6272"])
    assert result.exit_code == 2 and "not qwen3vl (from model type qwen3_vl" in result.output
