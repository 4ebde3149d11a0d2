"""Committed tuned schedules: where the build looks for something better than the default.

The top-level ``schedules/<target_key>/<config name>.json`` files are data written by ``tvm-paged tune``.
With none present for a (config, target), :func:`lookup` returns ``None`` and the default schedule is used.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TunedSchedule:
    """Builder knobs chosen by tuning for one (config, target), and where they came from."""

    knobs: dict = field(default_factory=dict)
    source: str = ""


def lookup(cfg, target) -> TunedSchedule | None:
    """The committed schedule for (``cfg``, ``target``), or ``None`` to use the default schedule."""
    return None
