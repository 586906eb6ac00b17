"""Sinks and what a person reads: shards, manifest, rejections, dataset card."""
