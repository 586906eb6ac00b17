"""Reruns into a bucket (a moto S3 server): staged, moved into place object by object, and a
failed rerun leaves the previous run's objects as they were."""

from __future__ import annotations

import json

import pytest
import yaml
from apache_beam.io.filesystems import FileSystems
from click.testing import CliRunner
from test_lifecycle_preflight import copy_flags, write_recipe
from test_object_store import BUCKET, bucket, keys, s3_args, s3_endpoint  # noqa: F401

from groundforge.cli import main
from groundforge.pipelines import run as run_module
from groundforge.pipelines.options import pipeline_options
from groundforge.pipelines.run import STAGING_DIR, run_recipe
from groundforge.recipe import load_recipe

PREFIX = "lifecycle-run/"
OUT = f"s3://{BUCKET}/{PREFIX.rstrip('/')}"


def run_cli(recipe, endpoint: str, out: str = OUT):
    FileSystems.set_options(None)  # nothing left over from an earlier run in this process
    return CliRunner().invoke(main, ["run", str(recipe), "--out", out, "--", *s3_args(endpoint)])


def objects(s3) -> dict[str, str]:
    """ETag of every object of the run (the reply cache aside)."""
    found = {}
    for key in keys(s3, PREFIX):
        if not key.startswith(PREFIX + "cache/"):
            found[key] = s3.head_object(Bucket=BUCKET, Key=key)["ETag"]
    return found


@pytest.mark.slow
def test_reruns_into_a_bucket(bucket, s3_endpoint, tmp_path, monkeypatch):  # noqa: F811
    recipe = write_recipe(tmp_path, copy_flags(tmp_path / "images"))
    result = run_cli(recipe, s3_endpoint)
    assert result.exit_code == 0, result.output
    first = objects(bucket)
    assert PREFIX + "manifest.json" in first

    (tmp_path / "typo").mkdir()
    typo = write_recipe(tmp_path / "typo", tmp_path / "imagez")
    assert run_cli(typo, s3_endpoint).exit_code == 1
    assert objects(bucket) == first

    def broken_report(run_dir, *args, **kwargs):
        raise OSError("upload refused")

    with monkeypatch.context() as patch:
        patch.setattr(run_module, "write_report", broken_report)
        FileSystems.set_options(pipeline_options(s3_args(s3_endpoint)))
        with pytest.raises(OSError, match="upload refused"):
            run_recipe(load_recipe(recipe), OUT, s3_args(s3_endpoint))
    assert objects(bucket) == first

    data = yaml.safe_load(recipe.read_text())
    data["source"]["path"] = str(copy_flags(tmp_path / "fewer", ["africa/chad.png"]))
    recipe.write_text(yaml.safe_dump(data))
    result = run_cli(recipe, s3_endpoint)
    assert result.exit_code == 0, result.output
    now = objects(bucket)
    body = bucket.get_object(Bucket=BUCKET, Key=PREFIX + "manifest.json")["Body"].read()
    manifest = json.loads(body)
    assert manifest["samples"] == 1
    shards = {k for k in now if k.endswith(".arrow")}
    assert shards == {PREFIX + s["path"] for s in manifest["shards"]}
    assert not any(k.startswith(PREFIX + STAGING_DIR) for k in now)


@pytest.mark.slow
def test_a_bucket_prefix_that_is_not_a_run_is_refused(bucket, s3_endpoint, tmp_path):  # noqa: F811
    bucket.put_object(Bucket=BUCKET, Key="notes/README.md", Body=b"someone's notes")
    recipe = write_recipe(tmp_path, copy_flags(tmp_path / "images"))
    out = f"s3://{BUCKET}/notes"
    result = run_cli(recipe, s3_endpoint, out)
    assert result.exit_code == 1 and out in result.output and "--force" in result.output
    assert keys(bucket, "notes/") == ["notes/README.md"]
