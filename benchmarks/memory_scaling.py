"""Does a run's memory grow with its size? Peak RSS and throughput at two corpus sizes.

Generates N distinct synthetic photos (640 x 480 textured JPEGs of about 80 KB, one entity each,
ten images per entity, an object on a plain noisy ground so the foreground box finds it) and runs
a scene recipe on them (foreground boxes, default dedup, scenes of 2..6 members,
``val_fraction: 0.1``) through ``groundforge run`` in a child process, at a small and a large size,
in-process and with ``--direct_running_mode=multi_processing``. The peak RSS of the whole process
tree (the CLI and every worker it starts) is sampled every 0.2 s. Prints, per mode, the peak RSS
at each size and their ratio (aim <= 1.3; a run whose memory grew with its size would show about
the size ratio), images/s at each size and their ratio (aim >= 0.8).

    .venv/bin/python benchmarks/memory_scaling.py                    # 2,000 and 20,000 images
    .venv/bin/python benchmarks/memory_scaling.py --sizes 500 5000 --modes in_process

Generated images are kept under ``--workdir`` and reused by later runs.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

IMAGES_PER_ENTITY = 10


def make_photo(index: int) -> bytes:
    """A distinct 640 x 480 JPEG: a textured ellipse or rectangle on a plain, slightly noisy
    ground (deterministic in ``index``)."""
    rng = np.random.default_rng(index)
    width, height = 640, 480
    ground = rng.integers(0, 256, 3)
    canvas = np.empty((height, width, 3), np.float32)
    canvas[:] = ground
    canvas += rng.normal(0, 2, canvas.shape)
    w, h = int(width * rng.uniform(0.3, 0.7)), int(height * rng.uniform(0.3, 0.7))
    x, y = rng.integers(0, width - w), rng.integers(0, height - h)
    yy, xx = np.mgrid[0:h, 0:w]
    if rng.random() < 0.5:
        inside = ((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2 <= 1
    else:
        inside = np.ones((h, w), bool)
    # Colour bands plus noise: the texture JPEG has to spend bytes on.
    base = (ground + rng.integers(80, 176, 3)) % 256
    bands = np.sin(xx[..., None] / rng.uniform(3, 12) + rng.uniform(0, 6, 3)) * 40
    texture = base + bands + rng.normal(0, 18, (h, w, 3))
    region = canvas[y : y + h, x : x + w]
    region[inside] = texture[inside]
    out = io.BytesIO()
    Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def make_corpus(folder: Path, n: int) -> Path:
    """``n`` photos in ``folder/<n>/``, entity ``entity_<i // 10>`` in the file name."""
    root = folder / str(n)
    done = root / ".complete"
    if done.exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        path = root / f"entity_{i // IMAGES_PER_ENTITY:05d}__{i:06d}.jpg"
        if not path.exists():
            path.write_bytes(make_photo(i))
    done.write_text("")
    return root


RECIPE = """\
name: memory-scaling
domain: thing
source:
  kind: image_folder
  path: {path}
  entity_from: stem
  separators: "_"
  strip_pattern: "__\\\\d+$"
boxes:
  method: foreground
  foreground_tolerance: 24
images:
  min_side: 16
scenes:
  scenes_per_image: 1
split:
  val_fraction: 0.1
"""


class PeakRSS:
    """Samples the summed RSS of a process and all its descendants until stopped."""

    def __init__(self, pid: int, every: float = 0.2):
        self.pid, self.every, self.peak = pid, every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            total = 0
            try:
                for proc in [root, *root.children(recursive=True)]:
                    try:
                        total += proc.memory_info().rss
                    except psutil.NoSuchProcess:
                        pass
            except psutil.NoSuchProcess:
                return
            self.peak = max(self.peak, total)
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_once(corpus: Path, out: Path, mode: str) -> tuple[float, int, str]:
    """``(seconds, peak RSS bytes, last output line)`` of one ``groundforge run``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    recipe = out.parent / f"{out.name}.yaml"
    recipe.write_text(RECIPE.format(path=corpus))
    command = [sys.executable, "-m", "groundforge.cli", "run", str(recipe), "--out", str(out)]
    if mode != "in_process":
        command += ["--", f"--direct_running_mode={mode}", "--direct_num_workers=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    with PeakRSS(proc.pid) as peak:
        output, _ = proc.communicate()
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}):\n{output[-4000:]}")
    lines = [line for line in output.splitlines() if "samples in" in line]
    return seconds, peak.peak, lines[-1].strip() if lines else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[2000, 20000])
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["in_process", "multi_processing"],
        choices=["in_process", "multi_processing", "multi_threading"],
    )
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "gf-mem")
    args = parser.parse_args()

    small, large = args.sizes
    corpora = {}
    for n in (small, large):
        t = time.perf_counter()
        corpora[n] = make_corpus(args.workdir / "images", n)
        print(f"corpus of {n} images ready in {time.perf_counter() - t:.0f} s", flush=True)
    rows = []
    for mode in args.modes:
        results = {}
        for n in (small, large):
            out = args.workdir / "runs" / f"{mode}-{n}"
            seconds, peak, line = run_once(corpora[n], out, mode)
            results[n] = (seconds, peak)
            print(
                f"{mode:>16} {n:>7} images: {seconds:7.1f} s, {n / seconds:6.1f} images/s, "
                f"peak RSS {peak / 2**30:5.2f} GiB   ({line})",
                flush=True,
            )
        (ts, ps), (tl, pl) = results[small], results[large]
        rows.append((mode, ps, pl, small / ts, large / tl))
    print()
    print(
        f"| mode | peak RSS {small} | peak RSS {large} | ratio "
        f"| images/s {small} | images/s {large} | ratio |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mode, ps, pl, rs, rl in rows:
        print(
            f"| {mode} | {ps / 2**30:.2f} GiB | {pl / 2**30:.2f} GiB | {pl / ps:.2f} "
            f"| {rs:.1f} | {rl:.1f} | {rl / rs:.2f} |"
        )


if __name__ == "__main__":
    main()
