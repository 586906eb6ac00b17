"""Recipes and bundled demo data."""
