"""Beam wiring only: the graphs, the generic stage wrapper, runner options."""
