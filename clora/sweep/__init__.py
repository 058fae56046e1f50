"""Sweeps: one base experiment and a grid (or list) of overrides, run as concurrent tenants on one
runtime, ranked by final held-out accuracy over seeds (``clora sweep``; docs/sweep.md).

``clora.sweep.spec`` expands a sweep file into tenants (pure, light: ``clora sweep --check`` loads
no torch), ``clora.sweep.ranking`` aggregates their results per point (pure),
``clora.sweep.report`` draws the table, results.json and the reward-curve picture.
"""

from clora.sweep.spec import Sweep, SweepFile, SweepPoint, SweepTenant, decode_sweep, expand, point_label

__all__ = ["Sweep", "SweepFile", "SweepPoint", "SweepTenant", "decode_sweep", "expand", "point_label"]
