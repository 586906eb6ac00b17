"""A reward of the kind users write themselves, importable as ``customrewards:char_variety``."""

from groundforge.trainer.rewards import completion_text


def char_variety(prompts, completions, **columns):
    """Differs between completions, so GRPO's advantages are not all zero on a random model."""
    return [len(set(completion_text(c))) / 8 for c in completions]
