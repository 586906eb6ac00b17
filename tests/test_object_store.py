"""Runs whose every file lives in an S3 bucket: a real moto S3 server on 127.0.0.1 behind Beam's
S3 filesystem, and a real `transformers serve` teacher behind a counting proxy."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import boto3
import pytest
import yaml
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions
from click.testing import CliRunner
from faultproxy import FaultProxy
from test_decontaminate import write_kvg_parquet
from test_dedup import record

from groundforge.annotators.teacher.cache import ReplyCache
from groundforge.annotators.teacher.types import TeacherReply
from groundforge.cli import main
from groundforge.examples import demo_recipe_path
from groundforge.filters.decontaminate import check_contamination, load_benchmark
from groundforge.filters.image import check_image
from groundforge.pipelines.run import redact_args
from groundforge.sources.image_folder import ImageFolderSource, NamingRule
from groundforge.sources.read import read_item

FLAGS = demo_recipe_path().parent / "data" / "flags"
NAMES = ["africa/chad.png", "europe/romania.png", "africa/mali.png"]
BUCKET = "groundforge-test"
ACCESS_KEY = "test-access-key"
SECRET_KEY = "s3-secret-0b7e2c-do-not-leak"
REGION = "us-east-1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """A moto S3 server in its own process, with one empty bucket; yields its URL."""
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url, timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.1)
        client(url).create_bucket(Bucket=BUCKET)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def client(endpoint: str):
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name=REGION,
    )


def s3_args(endpoint: str) -> list[str]:
    return [
        f"--s3_endpoint_url={endpoint}",
        f"--s3_access_key_id={ACCESS_KEY}",
        f"--s3_secret_access_key={SECRET_KEY}",
        f"--s3_region_name={REGION}",
    ]


@pytest.fixture
def s3(s3_endpoint):
    """Beam's filesystems pointed at the server for this process; yields a boto3 client."""
    FileSystems.set_options(PipelineOptions(s3_args(s3_endpoint)))
    yield client(s3_endpoint)
    FileSystems.set_options(None)


@pytest.fixture
def bucket(s3_endpoint):
    """A boto3 client, with Beam's filesystems left unconfigured: what reaches the server must
    come from the options the run is given."""
    FileSystems.set_options(None)
    yield client(s3_endpoint)
    FileSystems.set_options(None)


def keys(s3, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def download(s3, prefix: str, dest: Path) -> Path:
    """Copy every object under ``prefix`` into ``dest``, keeping the layout."""
    for key in keys(s3, prefix):
        target = dest / key[len(prefix) :].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(BUCKET, key, str(target))
    return dest


def key_of(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


# ---------------------------------------------------------------- the reply cache in a bucket


def test_reply_cache_in_a_bucket(s3):
    root = f"s3://{BUCKET}/cache-unit"
    cache = ReplyCache(root)
    assert len(cache) == 0 and cache.get(key_of(1)) is None
    cache.put(key_of(1), TeacherReply("item-1", text="a red flag", prompt_tokens=7))
    cache.put(key_of(2), TeacherReply("item-2", error="timeout"))
    assert keys(s3, "cache-unit/") == [f"cache-unit/{key_of(1)[:2]}/{key_of(1)}.json"]
    got = ReplyCache(root).get(key_of(1))
    assert (got.text, got.prompt_tokens, got.cached) == ("a red flag", 7, True)
    assert len(cache) == 1 and key_of(1) in cache and key_of(2) not in cache

    corrupt = f"cache-unit/{key_of(3)[:2]}/{key_of(3)}.json"
    s3.put_object(Bucket=BUCKET, Key=corrupt, Body=b'{"format": 1, "key": "')
    assert cache.get(key_of(3)) is None
    cache.put(key_of(3), TeacherReply("item-3", text="fresh"))
    assert cache.get(key_of(3)).text == "fresh"


def test_concurrent_writers_of_one_key_leave_a_whole_entry(s3):
    cache = ReplyCache(f"s3://{BUCKET}/cache-race")
    text = "x" * 200_000
    errors: list[BaseException] = []

    def write(n: int) -> None:
        try:
            for _ in range(3):
                cache.put(key_of(0), TeacherReply(f"w{n}", text=text))
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    torn = 0
    while any(t.is_alive() for t in threads):
        if keys(s3, "cache-race/"):
            got = cache.get(key_of(0))
            torn += got is None or got.text != text
    for t in threads:
        t.join()
    assert not errors and not torn
    assert cache.get(key_of(0)).item_id in {f"w{n}" for n in range(4)}
    # One object: no temporary names on an object store.
    assert keys(s3, "cache-race/") == [f"cache-race/{key_of(0)[:2]}/{key_of(0)}.json"]


# ---------------------------------------------------------------- an image folder in a bucket


def test_image_folder_in_a_bucket(s3):
    chad = (FLAGS / NAMES[0]).read_bytes()
    for rel, body in [
        ("flags/africa/chad.png", chad),
        ("flags/europe/romania.png", (FLAGS / NAMES[1]).read_bytes()),
        ("flags/.hidden/mali.png", b"x"),
        ("flags/notes.txt", b"not an image"),
        ("flags/top.png", (FLAGS / NAMES[2]).read_bytes()),
    ]:
        s3.put_object(Bucket=BUCKET, Key=rel, Body=body)
    meta = [
        {"sha256": hashlib.sha256(chad).hexdigest(), "license": "CC0-1.0"},
        {"path": "top.png", "entity": "Mali"},
    ]
    s3.put_object(
        Bucket=BUCKET,
        Key="flags/metadata.jsonl",
        Body="".join(json.dumps(m) + "\n" for m in meta).encode(),
    )
    src = ImageFolderSource(f"s3://{BUCKET}/flags/", "flag", NamingRule())
    assert src.root == f"s3://{BUCKET}/flags"
    assert src.partitions() == [("africa/chad.png", "europe/romania.png", "top.png")]
    flat = ImageFolderSource(f"s3://{BUCKET}/flags", "flag", NamingRule(), recursive=False)
    assert flat.list_files() == ["top.png"]
    items = [i for part in src.partitions() for i in src.items(part)]
    assert [(i.entity, i.license) for i in items] == [
        ("Chad", "CC0-1.0"),
        ("Romania", ""),
        ("Mali", ""),
    ]
    assert items[1].location == f"s3://{BUCKET}/flags/europe/romania.png"
    records = [read_item(i) for i in items]
    assert all(v.keep for v in records)
    assert records[0].value.image == chad

    with pytest.raises(FileNotFoundError, match="holds no files"):
        ImageFolderSource(f"s3://{BUCKET}/nowhere", "flag", NamingRule()).partitions()


def test_benchmarks_in_a_bucket_are_read_through_filesystems(s3, tmp_path):
    chad, romania = ((FLAGS / n).read_bytes() for n in NAMES[:2])
    local = tmp_path / "bench.parquet"
    write_kvg_parquet(local, [(11, chad, "chad.png"), (12, None, "files/romania.png")])
    s3.put_object(Bucket=BUCKET, Key="bench/test.parquet", Body=local.read_bytes())
    s3.put_object(Bucket=BUCKET, Key="bench/files/romania.png", Body=romania)
    s3.put_object(Bucket=BUCKET, Key="pics/africa/chad.png", Body=chad)
    s3.put_object(Bucket=BUCKET, Key="pics/.hidden/mali.png", Body=chad)
    s3.put_object(Bucket=BUCKET, Key="pics/notes.txt", Body=b"not an image")

    parquet = load_benchmark(f"s3://{BUCKET}/bench/test.parquet")
    folder_of_parquet = load_benchmark(f"s3://{BUCKET}/bench")
    assert parquet.ids == folder_of_parquet.ids == ("11", "12")
    pictures = load_benchmark(f"s3://{BUCKET}/pics/")
    assert pictures.ids == ("africa/chad.png",)
    copy = check_image(record("train/chad.png", chad)).value
    assert check_contamination(copy, parquet).metrics["benchmark_id"] == "11"
    with pytest.raises(ValueError, match="does not exist"):
        load_benchmark(f"s3://{BUCKET}/nowhere")


# ---------------------------------------------------------------- whole runs into a bucket


@pytest.fixture
def flags(tmp_path) -> Path:
    folder = tmp_path / "images"
    for name in NAMES:
        target = folder / name.replace("/", "_")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(FLAGS / name, target)
    return folder


def chat_section(base_url: str, model: str, **extra) -> dict:
    return {
        "model": model,
        "base_url": base_url,
        "codec": "qwen25vl",
        "max_tokens": 8,
        "max_retries": 0,
        "timeout": 30,
        "max_concurrency": 4,
        "batch_size": 8,
        **extra,
    }


def write_recipe(tmp_path: Path, flags: Path, **sections) -> Path:
    recipe = {
        "name": "bucket-test",
        "domain": "flag",
        "source": {"kind": "image_folder", "path": str(flags), "entity_from": "stem"},
        "boxes": {"method": "foreground", "foreground_background": "white"},
        **sections,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_cli(recipe: Path, out: str, endpoint: str, code: int = 0):
    FileSystems.set_options(None)  # nothing left over from an earlier run in this process
    result = CliRunner().invoke(main, ["run", str(recipe), "--out", out, "--", *s3_args(endpoint)])
    assert result.exit_code == code, result.output
    return result


@pytest.mark.slow
def test_teacher_run_into_a_bucket_resumes_from_its_cache(
    bucket, s3_endpoint, flags, tmp_path, teacher_server
):
    base_url, model = teacher_server
    out = f"s3://{BUCKET}/teacher-run"
    with FaultProxy(base_url) as proxy:
        recipe = write_recipe(tmp_path, flags, teacher=chat_section(proxy.base_url, model))
        # The tiny model's replies are no rationales: no sample is kept, and the run exits 1.
        run_cli(recipe, out, s3_endpoint, code=1)
        assert proxy.total == len(NAMES)
        cached = [k for k in keys(bucket, "teacher-run/cache/") if k.endswith(".json")]
        assert len(cached) == len(NAMES)

        proxy.reset()
        run_cli(recipe, out, s3_endpoint, code=1)
        assert proxy.total == 0

    local = download(bucket, "teacher-run/", tmp_path / "teacher-run")
    manifest = json.loads((local / "manifest.json").read_text())
    assert manifest["models"]["teacher"]["cached"] == len(NAMES)
    assert manifest["models"]["teacher"]["sent"] == 0
    stages = {s["stage"]: s for s in manifest["stages"]}
    assert stages["teacher"]["kept"] == len(NAMES)
    # Written after the pipeline, by this process: the endpoint options reached it too.
    for name in ("rejections.parquet", "rejection_previews.parquet", "README.md", "report.html"):
        assert (local / name).is_file(), name
    assert (local / "shards" / "dataset_dict.json").is_file()
    assert not Path("s3:").exists()


@pytest.mark.slow
def test_run_into_a_bucket_gives_loadable_shards(
    bucket, s3_endpoint, flags, tmp_path, teacher_server
):
    # The student keeps what the tiny model answers (the teacher's rationale check drops every
    # random reply), so these shards hold rows with images.
    from datasets import load_from_disk
    from PIL import Image

    base_url, model = teacher_server
    out = f"s3://{BUCKET}/student-run"
    with FaultProxy(base_url) as proxy:
        recipe = write_recipe(tmp_path, flags, student=chat_section(proxy.base_url, model, k=2))
        result = run_cli(recipe, out, s3_endpoint)
        assert proxy.total == 2 * len(NAMES)
        assert SECRET_KEY not in result.output

    local = download(bucket, "student-run/", tmp_path / "student-run")
    manifest = json.loads((local / "manifest.json").read_text())
    assert manifest["samples"] == len(NAMES)
    assert SECRET_KEY not in (local / "manifest.json").read_text()
    assert f"--s3_endpoint_url={s3_endpoint}" in manifest["runner"]["args"]
    for shard in manifest["shards"]:
        assert hashlib.sha256((local / shard["path"]).read_bytes()).hexdigest() == shard["sha256"]

    dataset = load_from_disk(str(local / "shards"))
    rows = [row for split in dataset.values() for row in split]
    assert len(rows) == len(NAMES)
    targets = set()
    for row in rows:
        assert isinstance(row["image"], Image.Image)
        assert row["image"].size == (row["width"], row["height"])
        targets.add(row["target"])
    assert targets == {"Africa Chad", "Europe Romania", "Africa Mali"}

    FileSystems.set_options(None)
    inspected = CliRunner().invoke(main, ["inspect", out, "-n", "1", "--", *s3_args(s3_endpoint)])
    assert inspected.exit_code == 0, inspected.output
    assert manifest["recipe_hash"] in inspected.output


def test_credential_options_are_redacted():
    args = [
        "--s3_endpoint_url=http://127.0.0.1:9",
        f"--s3_secret_access_key={SECRET_KEY}",
        "--s3_session_token",
        "tok-123",
        "--s3_access_key_id=AKIA1",
        "--direct_num_workers=2",
    ]
    assert redact_args(args) == [
        "--s3_endpoint_url=http://127.0.0.1:9",
        "--s3_secret_access_key=***",
        "--s3_session_token",
        "***",
        "--s3_access_key_id=***",
        "--direct_num_workers=2",
    ]
