"""The bundled trainer: shards to TRL datasets, rewards, SFT and GRPO, knowledge probe, evaluation."""
