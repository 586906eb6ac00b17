"""Training log: one JSON line per logging step, with the reward means and a few decoded boxes.

TRL already logs ``rewards/<name>/mean`` for every GRPO reward; this callback writes them to
``<output_dir>/train_log.jsonl`` next to the loss and learning rate, warns when one is not finite
(TRL logs ``None`` for a reward that was NaN on every row), and, during GRPO, records the last
completions with the last box read from each (raw values in the model's frame), which is the
quickest way to spot a reward stuck at 0 because of a coordinate-frame or format mistake.

A reward that gives GRPO nothing to learn from is reported (a warning on the console and a
``stalled`` entry in the log record) once it has done so for ``stall_steps`` consecutive steps
(:class:`RewardStall`): its mean is exactly 0, or it has one value within every group of
completions of the last generation batch (no advantage between a prompt's completions; a mean
of 0 is the usual case, e.g. a reward that needs ``<answer>`` on replies that never write it).

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
STALL_STEPS = 10


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _plain(value: Any) -> Any:
    """A JSON-safe copy of a logged value (NaN and infinities become None)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def flat_groups(values: list[float | None], group: int) -> bool | None:
    """Whether every group of ``group`` consecutive values has a single value (None and NaN are
    left out; a group with none left does not count); None when no group counts.

    >>> flat_groups([0.0, 0.0, 1.0, 1.0], 2), flat_groups([0.0, 1.0, 1.0, 1.0], 2)
    (True, False)
    >>> flat_groups([None, None], 2) is None
    True
    """
    verdict = None
    for start in range(0, len(values), max(group, 1)):
        scored = {v for v in values[start : start + group] if _finite(v)}
        if scored:
            if len(scored) > 1:
                return False
            verdict = True
    return verdict


class RewardStall:
    """Counts, per reward, the consecutive steps on which it gave no learning signal, and says
    once per streak when a streak reaches ``steps``."""

    def __init__(self, steps: int = STALL_STEPS) -> None:
        if steps < 1:
            raise ValueError(f"stall_steps must be >= 1, got {steps}")
        self.steps = steps
        self._since: dict[str, int] = {}
        self._told: set[str] = set()
        self._last_step = 0

    def update(
        self, step: int, means: dict[str, Any], flat: dict[str, bool | None] | None = None
    ) -> dict[str, str]:
        """Feed one log event (``means``: reward name -> mean; ``flat``: name -> whether every
        group had one value); returns ``{name: why}`` for the streaks that reach ``steps`` now.
        """
        flat = flat or {}
        covered = max(step - self._last_step, 1)  # steps since the previous log event
        self._last_step = step
        out = {}
        for name, mean in means.items():
            zero = _finite(mean) and mean == 0
            if not (zero or flat.get(name)):
                self._since.pop(name, None)
                self._told.discard(name)
                continue
            self._since[name] = self._since.get(name, 0) + covered
            if self._since[name] >= self.steps and name not in self._told:
                self._told.add(name)
                why = "mean exactly 0" if zero else f"mean {mean:g}, no variance within any group"
                out[name] = f"{why} for {self._since[name]} steps"
        return out


class TrainLogCallback(TrainerCallback):
    """Append each log event to ``path`` as JSON: ``step``, ``epoch``, ``metrics`` (everything
    the trainer logged), ``rewards`` (name -> mean), ``nonfinite`` (rewards whose mean is NaN
    or missing), ``stalled`` (rewards that just gave no signal for ``stall_steps`` steps, with
    why) and, once :meth:`attach` gave it a GRPO trainer, ``completions``."""

    def __init__(
        self, path: str | Path, completions: int = 4, stall_steps: int = STALL_STEPS
    ) -> None:
        self.path = Path(path)
        self.completions = completions
        self.stall = RewardStall(stall_steps)
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
        try:
            flat = self._flat_rewards(rewards)
        except Exception as exc:  # a log helper must never stop a training run
            _LOG.warning("could not read the last rewards: %s", exc)
            flat = {}
        stalled = self.stall.update(state.global_step, rewards, flat)
        for name, why in stalled.items():
            _LOG.warning(
                "step %d: reward %s gives GRPO nothing to learn from (%s): check that the "
                "prompts ask for the answer format the reward reads and that SFT taught it",
                state.global_step,
                name,
                why,
            )
        record: dict[str, Any] = {
            "step": state.global_step,
            "epoch": _plain(state.epoch),
            "metrics": {key: _plain(value) for key, value in logs.items()},
        }
        if rewards:
            record["rewards"] = {name: _plain(value) for name, value in rewards.items()}
            record["nonfinite"] = nonfinite
        if stalled:
            record["stalled"] = stalled
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

    def _flat_rewards(self, names) -> dict[str, bool | None]:
        # GRPOTrainer keeps each reward's values of the latest generation batch, in groups of
        # num_generations consecutive completions.
        logs = getattr(self._trainer, "_logs", None)
        group = getattr(self._trainer, "num_generations", None)
        if not isinstance(logs, dict) or not isinstance(group, int):
            return {}
        values = logs.get("rewards") or {}
        return {name: flat_groups(list(values[name]), group) for name in names if name in values}

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
