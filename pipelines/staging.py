"""What remote Beam workers need to run groundforge, and what the submitting machine needs.

A pickled stage refers to groundforge's classes by module, so a worker must have groundforge
installed to unpickle it. For a runner whose workers are not this process, the CLI builds a wheel
of this source tree and passes it as ``--extra_package``, with a generated ``--requirements_file``
that pins groundforge's dependencies to the versions installed here and takes torch's CPU build
from PyTorch's index (a bare torch requirement pulls the CUDA build, several GB). Beam's worker
boot installs the requirements first, then the extra packages, so the wheel's own ``torch>=``
requirement is already met by then.

Nothing is staged when the workers run in this environment (the DirectRunner, any runner with a
LOOPBACK environment), nor when the user takes charge of the workers' software: their own
container image (``--sdk_container_image``, ``--environment_config`` of a DOCKER environment) or
their own ``--extra_package`` / ``--setup_file``.
"""

from __future__ import annotations

import contextlib
import email.parser
import importlib
import importlib.metadata
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import apache_beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import (
    FlinkRunnerOptions,
    PipelineOptions,
    PortableOptions,
    SetupOptions,
    SparkRunnerOptions,
    StandardOptions,
    WorkerOptions,
)
from apache_beam.runners.portability.flink_runner import MAGIC_HOST_NAMES
from apache_beam.runners.portability.spark_runner import LOCAL_MASTER_PATTERN
from apache_beam.runners.portability.stager import SKIP_REQUIREMENTS_CACHE
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

import groundforge
from groundforge.pipelines.options import pipeline_options

log = logging.getLogger(__name__)

TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
REQUIREMENTS_FILE = "requirements.txt"


def runner_name(options: PipelineOptions) -> str:
    """The runner's class name, however it was spelled (``dataflow``, a dotted path, ...)."""
    runner = options.view_as(StandardOptions).runner or StandardOptions.DEFAULT_RUNNER
    name = runner if isinstance(runner, str) else type(runner).__name__
    name = name.rsplit(".", 1)[-1].lower()
    for known in StandardOptions.KNOWN_RUNNER_NAMES:
        if known.lower() in (name, name + "runner"):
            return known
    return name


def workers_are_local(options: PipelineOptions) -> bool:
    """Whether the runner's workers run in this Python environment (nothing to stage).

    Follows the runners' own defaults: Prism, and Flink and Spark with a local master, choose a
    LOOPBACK environment when none is given.
    """
    name = runner_name(options)
    if name in StandardOptions.LOCAL_RUNNERS and name != "PrismRunner":
        return True  # in-process workers; they ignore --environment_type
    environment = (options.view_as(PortableOptions).environment_type or "").upper()
    if environment:
        return environment == "LOOPBACK"
    if name == "PrismRunner":
        return True
    if name == "FlinkRunner":
        return options.view_as(FlinkRunnerOptions).flink_master in MAGIC_HOST_NAMES
    if name == "SparkRunner":
        master = options.view_as(SparkRunnerOptions).spark_master_url
        return re.match(LOCAL_MASTER_PATTERN, master) is not None
    return False


def own_worker_setup(options: PipelineOptions) -> str | None:
    """The flag with which the user provides the workers' software themselves, if any."""
    setup = options.view_as(SetupOptions)
    if setup.extra_packages:
        return "--extra_package"
    if setup.setup_file:
        return "--setup_file"
    worker = options.view_as(WorkerOptions)
    if worker.sdk_container_image or worker.worker_harness_container_image:
        return "--sdk_container_image"
    portable = options.view_as(PortableOptions)
    if (portable.environment_type or "DOCKER").upper() == "DOCKER":
        if portable.lookup_environment_option("docker_container_image"):
            return "--environment_option=docker_container_image"
        if portable.environment_config:
            return "--environment_config"
    return None


@dataclass(frozen=True)
class StagingPlan:
    """What to stage for a submission: groundforge's wheel, the pinned requirements, or nothing.

    ``reason`` says why, for remote workers; it is None when the workers run here.
    """

    wheel: bool
    requirements: bool
    reason: str | None


def staging_plan(options: PipelineOptions) -> StagingPlan:
    """Decide what the workers get from this submission (pure: reads the options only)."""
    if workers_are_local(options):
        return StagingPlan(False, False, None)
    own = own_worker_setup(options)
    if own:
        return StagingPlan(False, False, f"nothing staged, their software comes from {own}")
    setup = options.view_as(SetupOptions)
    if setup.requirements_file:
        return StagingPlan(True, False, "its requirements from --requirements_file")
    if setup.requirements_cache not in (None, SKIP_REQUIREMENTS_CACHE):
        # The stager runs `pip download` on each line of the requirements file; the line that
        # names torch's CPU index is not a requirement, so that download would fail.
        raise ValueError(
            "--requirements_cache cannot be used with groundforge's generated requirements (they "
            "name PyTorch's CPU index); leave it out so that the workers install from the "
            "package indexes, pass your own --requirements_file, or use a worker image "
            "(--sdk_container_image or --environment_config, see the README)"
        )
    return StagingPlan(True, True, "with pinned requirements")


def _public_release(version: str | None) -> str | None:
    """``version`` if workers can install it from an index (not a local or dev build)."""
    try:
        parsed = Version(version) if version else None
    except InvalidVersion:
        return None
    if parsed is None or parsed.local or parsed.is_devrelease:
        return None
    return str(parsed)


def worker_requirements(requires: Iterable[str], installed: Callable[[str], str | None]) -> str:
    """A requirements file for the workers: each of ``requires`` (``Requires-Dist`` lines) pinned
    to the version ``installed`` here; torch as the CPU build of the same release.

    Requirements of extras are left out; a dependency that is not installed here, or installed as
    a local or dev build, keeps its specifier.
    """
    lines = [
        f"# groundforge {groundforge.__version__}: worker requirements, installed before its wheel",
        "# torch is the CPU build from PyTorch's index: PyPI's Linux wheel is the CUDA build.",
        f"--extra-index-url {TORCH_CPU_INDEX}",
    ]
    for line in requires:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
        version = installed(req.name)
        if canonicalize_name(req.name) == "torch":
            release = Version(version).base_version if version else None
            lines.append(f"torch=={release}+cpu" if release else f"torch{req.specifier}")
            continue
        pinned = _public_release(version)
        lines.append(f"{req.name}{extras}" + (f"=={pinned}" if pinned else str(req.specifier)))
    return "\n".join(lines) + "\n"


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def wheel_requirements(wheel: Path) -> list[str]:
    """The ``Requires-Dist`` lines of a wheel's metadata."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = email.parser.Parser().parsestr(archive.read(name).decode())
    return metadata.get_all("Requires-Dist") or []


def staging_args(wheel: Path, requirements: Path | None) -> list[str]:
    """The Beam arguments that stage ``wheel`` and ``requirements``."""
    args = [f"--extra_package={wheel}"]
    if requirements is not None:
        # Workers install the requirements from the indexes themselves: the stager's cache would
        # `pip download` each line here, the index line included.
        args += [
            f"--requirements_file={requirements}",
            f"--requirements_cache={SKIP_REQUIREMENTS_CACHE}",
        ]
    return args


def source_root() -> Path:
    """The source tree of the running groundforge (the repository root is the package)."""
    root = Path(groundforge.__file__).resolve().parent
    if not (root / "pyproject.toml").is_file():
        raise ValueError(
            f"groundforge in {root} is an installed package, not a source checkout, so no wheel "
            "can be built for the workers: pass the wheel you installed it from with "
            "--extra_package=groundforge-VERSION-py3-none-any.whl, or a worker image "
            "(--sdk_container_image or --environment_config, see the README)"
        )
    return root


def _copy_source(root: Path, dest: Path) -> None:
    """Copy what a wheel is built from: top-level files and the package folders, no caches.

    A copy keeps the build's own folders (``build/``, ``*.egg-info``) out of the source tree, and
    leaves out run outputs and data folders next to the packages.
    """

    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = {
            n
            for n in names
            if n.startswith(".") or n == "__pycache__" or n.endswith((".pyc", ".egg-info"))
        }
        if Path(folder) == root:
            skip |= {
                n for n in names if (root / n).is_dir() and not (root / n / "__init__.py").is_file()
            }
        return skip

    shutil.copytree(root, dest, ignore=ignore)


def build_wheel(root: Path, out_dir: Path) -> Path:
    """Build groundforge's wheel from the source tree ``root`` into ``out_dir``.

    Without build isolation first (fast, offline); if this environment's setuptools is too old for
    the project, with pip's isolated build environment.
    """
    source = out_dir / "source"
    _copy_source(root, source)
    wheels = out_dir / "wheel"
    base = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check"]
    for isolation in (["--no-build-isolation"], []):
        done = subprocess.run(
            [*base, *isolation, "--wheel-dir", str(wheels), str(source)],
            capture_output=True,
            text=True,
        )
        if done.returncode == 0:
            break
    else:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise ValueError(
            f"could not build groundforge's wheel for the workers from {root}:\n{tail}"
        )
    shutil.rmtree(source)
    return next(wheels.glob("groundforge-*.whl"))


@dataclass(frozen=True)
class WorkerStaging:
    """The Beam arguments to run with, what was added to them for the workers, and a line that
    says so (None when the workers run here)."""

    args: list[str]
    wheel: Path | None
    requirements: Path | None
    note: str | None


@contextlib.contextmanager
def stage_for_workers(beam_args: Sequence[str]) -> Iterator[WorkerStaging]:
    """The Beam arguments with groundforge staged for remote workers, when they need it.

    The wheel and requirements live in a temporary folder until the block ends; the runners copy
    them at submission, and the CLI waits for the run to finish.
    """
    plan = staging_plan(pipeline_options(beam_args))
    if not plan.wheel:
        note = f"remote workers: {plan.reason}" if plan.reason else None
        yield WorkerStaging(list(beam_args), None, None, note)
        return
    with tempfile.TemporaryDirectory(prefix="groundforge-staging-") as tmp:
        wheel = build_wheel(source_root(), Path(tmp))
        requirements = None
        if plan.requirements:
            requirements = Path(tmp) / REQUIREMENTS_FILE
            requirements.write_text(
                worker_requirements(wheel_requirements(wheel), installed_version)
            )
        args = list(beam_args) + staging_args(wheel, requirements)
        note = f"remote workers: staging {wheel.name}, {plan.reason}"
        yield WorkerStaging(args, wheel, requirements, note)


def gcp_install_command() -> str:
    """How to add Google Cloud's client libraries without pip replacing torch or transformers."""
    return (
        "pip freeze --exclude-editable > pins.txt && "
        f"pip install -c pins.txt 'apache-beam[gcp]=={apache_beam.__version__}'"
    )


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def check_submitter(beam_args: Sequence[str], out: str) -> None:
    """Fail early, naming the fix, when this machine lacks what the runner or ``out`` needs."""
    options = pipeline_options(beam_args)
    dataflow = runner_name(options) == "DataflowRunner"
    gcs = FileSystems.get_scheme(out) == "gs"
    if (dataflow and not _importable("apache_beam.runners.dataflow.internal.apiclient")) or (
        gcs and not _importable("apache_beam.io.gcp.gcsfilesystem")
    ):
        needs = "the Dataflow runner" if dataflow else f"writing to {out}"
        raise ValueError(
            f"{needs} needs Google Cloud's client libraries, which are not installed here; add "
            f"them while keeping every installed version (torch, transformers) as it is:\n"
            f"  {gcp_install_command()}"
        )
    if not workers_are_local(options) and FileSystems.get_scheme(out) is None:
        log.warning(
            "--out %s is a local path, but the workers of %s do not run on this machine: use a "
            "location they all reach (gs://, s3://, hdfs://, or a shared mount)",
            out,
            runner_name(options),
        )
