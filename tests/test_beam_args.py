"""Arguments meant for Beam that Beam would ignore are refused, never run on silently."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from groundforge.cli import main
from groundforge.pipelines.options import check_beam_args


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--direct_running_mode=multi_processing", "--direct_num_workers", "2"],
        ["--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=LOOPBACK"],
        ["--s3_endpoint_url=http://127.0.0.1:9000", "--s3_access_key_id=k"],
        ["--runner=DataflowRunner", "--project=p", "--region=r", "--temp_location=gs://b/t"],
        ["--runner=FlinkRunner", "--flink_master=localhost:8081"],
    ],
)
def test_options_beam_knows_pass(args):
    check_beam_args(args)


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--runnr=PortableRunner"], "--runnr is not an option Beam knows; did you mean --runner?"),
        (["--direct_num_worker=2"], "did you mean --direct_num_workers?"),
        (["-v"], "-v is groundforge's option, not Beam's: give it before `--`"),
        (["--force"], "--force is groundforge's option"),
        (["runs/x"], "'runs/x' is not an option"),
    ],
)
def test_what_beam_would_ignore_is_refused_by_name(args, said):
    with pytest.raises(ValueError, match="Beam options") as refused:
        check_beam_args(args)
    assert said in str(refused.value)


def test_a_typo_stops_the_run_before_anything_is_written(tmp_path):
    recipe = tmp_path / "r.yaml"
    images = tmp_path / "images"
    images.mkdir()
    recipe.write_text(f"name: r\ndomain: flag\nsource: {{kind: image_folder, path: {images}}}\n")
    out = tmp_path / "out"
    args = ["run", str(recipe), "--out", str(out), "--", "--runnr=PortableRunner"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert "did you mean --runner?" in result.output
    assert not out.exists()
    dry = CliRunner().invoke(main, [*args[:4], "--dry-run", "--", "-v"])
    assert dry.exit_code == 1 and "-v is groundforge's option" in dry.output
