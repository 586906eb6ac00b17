"""The bundled trainer: shards to TRL datasets, rewards, SFT, GRPO, knowledge probe, evaluation."""
