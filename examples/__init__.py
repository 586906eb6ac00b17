"""Bundled recipes and demo data (public-domain flag images, see data/flags/COPYRIGHT)."""

from __future__ import annotations

from pathlib import Path

EXAMPLES_DIR = Path(__file__).resolve().parent


def demo_recipe_path() -> Path:
    """The recipe ``groundforge demo`` runs: the bundled flags, boxes from the foreground."""
    return EXAMPLES_DIR / "flags.yaml"
