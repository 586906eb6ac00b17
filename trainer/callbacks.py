"""Training log: one JSON line per logging step, with the reward means and a few decoded boxes.

TRL already logs ``rewards/<name>/mean`` for every GRPO reward; this callback writes them to
``<output_dir>/train_log.jsonl`` next to the loss and learning rate, warns when one is not finite
(TRL logs ``None`` for a reward that was NaN on every row), and, during GRPO, records the last
completions with the last box read from each (raw values in the model's frame), which is the
quickest way to spot a reward stuck at 0 because of a coordinate-frame or format mistake.

Each run has its own log: a run that starts from step 0 moves an earlier ``train_log.jsonl`` to
``train_log.<n>.jsonl`` (1 for the oldest); a run resumed from a checkpoint continues the log,
without the records logged after that checkpoint (those steps run again).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from groundforge.schemas.codecs import extract_quads
from groundforge.trainer.rewards import completion_text

_LOG = logging.getLogger(__name__)

LOG_FILE = "train_log.jsonl"
_TEXT_CHARS = 300


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _plain(value: Any) -> Any:
    """A JSON-safe copy of a logged value (NaN and infinities become None)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


class TrainLogCallback(TrainerCallback):
    """Append each log event to ``path`` as JSON: ``step``, ``epoch``, ``metrics`` (everything
    the trainer logged), ``rewards`` (name -> mean), ``nonfinite`` (rewards whose mean is NaN
    or missing) and, once :meth:`attach` gave it a GRPO trainer, ``completions``."""

    def __init__(self, path: str | Path, completions: int = 4) -> None:
        self.path = Path(path)
        self.completions = completions
        self._trainer: Any = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or not self.path.is_file():
            return
        if state.global_step == 0:
            rotate_log(self.path)
        else:
            keep_log_until(self.path, state.global_step)

    def attach(self, trainer: Any) -> None:
        """Read the trainer's last completions (GRPO keeps them for its own logging)."""
        self._trainer = trainer

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        rewards = {
            key[len("rewards/") : -len("/mean")]: value
            for key, value in logs.items()
            if key.startswith("rewards/") and key.endswith("/mean")
        }
        nonfinite = sorted(name for name, value in rewards.items() if not _finite(value))
        if "reward" in logs and not _finite(logs["reward"]):
            nonfinite.append("reward")
        if nonfinite:
            _LOG.warning(
                "step %d: reward mean not finite for %s (a reward returning None or NaN on every "
                "row?)",
                state.global_step,
                ", ".join(nonfinite),
            )
        record: dict[str, Any] = {
            "step": state.global_step,
            "epoch": _plain(state.epoch),
            "metrics": {key: _plain(value) for key, value in logs.items()},
        }
        if rewards:
            record["rewards"] = {name: _plain(value) for name, value in rewards.items()}
            record["nonfinite"] = nonfinite
        try:
            samples = self._last_completions()
        except Exception as exc:  # a log helper must never stop a training run
            _LOG.warning("could not read the last completions: %s", exc)
            samples = []
        if samples:
            record["completions"] = samples
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as out:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")

    def _last_completions(self) -> list[dict[str, Any]]:
        # GRPOTrainer keeps the latest generation batch in `_logs`; other trainers have none.
        logs = getattr(self._trainer, "_logs", None)
        if not isinstance(logs, dict) or self.completions <= 0:
            return []
        completions = list(logs.get("completion") or [])[-self.completions :]
        samples = []
        for completion in completions:
            text = completion_text(completion)
            quads = extract_quads(text)
            samples.append({"text": text[:_TEXT_CHARS], "box": list(quads[-1]) if quads else None})
        return samples


def rotate_log(path: Path) -> Path:
    """Move the log at ``path`` to the first free ``<stem>.<n>.jsonl``; returns the new path."""
    n = 1
    while (moved := path.with_name(f"{path.stem}.{n}{path.suffix}")).exists():
        n += 1
    path.replace(moved)
    return moved


def keep_log_until(path: Path, step: int) -> None:
    """Drop the records of steps after ``step`` (a resumed run logs them again), and a last line
    a killed run left half written."""
    kept = []
    for line in path.read_text("utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line + "\n")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(kept), "utf-8")
    tmp.replace(path)


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``train_log.jsonl`` (a folder means its ``train_log.jsonl``)."""
    path = Path(path)
    if path.is_dir():
        path = path / LOG_FILE
    with path.open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]
