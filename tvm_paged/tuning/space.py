"""The design space of a kernel on a target: its builder knobs (``kernels.knob_space``), and what to measure next.

The space is the product of each knob's candidate values; a point is an index in mixed radix (index 0 = every
knob at its first value = the builder's default). Proposals never repeat a measured point:

1. the default first (trial 0, the untuned baseline);
2. with a guided strategy, the default's neighbours next (each knob moved alone, in a seeded order): the
   builder's default is a designed point, a one-knob move from it is the change most likely to pay, and a
   sparse random start was seen to miss the single move (``prefetch="kv"``) that won a bucket by 3-16% in the
   benchmark;
3. random points without replacement until a few are measured (and whenever the budget covers every point left,
   which makes a small space exhaustive);
4. then a cost model ranks the points not yet measured and the best predicted are measured, with a quarter of
   each round still drawn at random so a wrong model cannot trap the search:
   ``xgb``: gradient-boosted trees (the ``xgboost`` package MetaSchedule's ``XGBModel`` wraps) over knob features,
   fitted to throughput relative to the bucket's best; ``mutate``: neighbours (one knob changed) of the best
   points so far; ``random``: no model.

MetaSchedule's own ``XGBModel`` is not used directly: its ``update``/``predict`` need a ``TuneContext``, whose
constructor imports ``tvm.s_tir.tensor_intrin`` (about 20 s per process on this machine, minutes under load),
and it extracts features from schedules, not from builder knobs.
"""

from __future__ import annotations

import json
import math

import numpy as np

STRATEGIES = ("xgb", "mutate", "random")
_MIN_FOR_MODEL = 4  # measured points in a bucket before a model is fitted
_ENUMERATE_LIMIT = 200_000  # larger spaces are sampled, not enumerated


def knob_key(knobs: dict) -> str:
    """Canonical text of a knob dict (sorted keys): the identity of a point across runs."""
    return json.dumps(knobs, sort_keys=True)


class KnobSpace:
    """``{knob: [values]}`` as a finite, indexable set of knob dicts."""

    def __init__(self, space: dict[str, list]):
        self.names = list(space)
        self.values = []
        for vals in space.values():  # duplicates dropped (a default may reappear in the list), order kept
            kept: list = []
            for v in vals:
                if not any(type(v) is type(k) and v == k for k in kept):
                    kept.append(v)
            self.values.append(kept)
        if any(not v for v in self.values):
            raise ValueError(f"knob space: a knob has no candidate values: {space}")
        self.size = math.prod(len(v) for v in self.values)

    def knobs(self, index: int) -> dict:
        out = {}
        for name, vals in zip(reversed(self.names), reversed(self.values)):
            index, r = divmod(index, len(vals))
            out[name] = vals[r]
        return {n: out[n] for n in self.names}

    def index(self, knobs: dict) -> int | None:
        """The index of ``knobs``, or None when a name or value is not in the space (a stale log row)."""
        if not isinstance(knobs, dict) or set(knobs) != set(self.names):
            return None
        idx = 0
        for name, vals in zip(self.names, self.values):
            pos = next((i for i, v in enumerate(vals) if type(v) is type(knobs[name]) and v == knobs[name]), None)
            if pos is None:
                return None
            idx = idx * len(vals) + pos
        return idx

    @property
    def default(self) -> dict:
        return self.knobs(0)

    def features(self, index: int) -> np.ndarray:
        """Numbers for a cost model: log2 of numeric knobs, one-hot of the others."""
        knobs = self.knobs(index)
        feats: list[float] = []
        for name, vals in zip(self.names, self.values):
            v = knobs[name]
            if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vals):
                feats.append(math.log2(v) if v > 0 else float(v))
            else:
                feats.extend(1.0 if (type(x) is type(v) and x == v) else 0.0 for x in vals)
        return np.asarray(feats, dtype=np.float32)

    def neighbours(self, index: int) -> list[int]:
        """Points that differ from ``index`` in one knob."""
        knobs = self.knobs(index)
        out = []
        for name, vals in zip(self.names, self.values):
            for v in vals:
                if not (type(v) is type(knobs[name]) and v == knobs[name]):
                    out.append(self.index({**knobs, name: v}))
        return out


class Proposer:
    """Chooses the next points of one bucket to measure (see the module docstring)."""

    def __init__(self, space: KnobSpace, strategy: str = "xgb", seed: int | list[int] = 0):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.space = space
        self.rng = np.random.default_rng(seed)
        self.strategy = strategy
        if strategy == "xgb":
            try:
                import xgboost  # noqa: F401, PLC0415
            except ImportError:
                self.strategy = "mutate"  # the cost model is optional: mutate-the-best needs nothing
        self.used_model = False
        nb = space.neighbours(0) if space.size > 1 else []
        self._default_neighbours = [int(i) for i in self.rng.permutation(np.asarray(nb, dtype=np.int64))]

    def propose(self, measured: dict[int, float | None], k: int) -> list[int]:
        """Up to ``k`` unmeasured points. ``measured``: index -> seconds per call (None = failed)."""
        space = self.space
        out: list[int] = []
        if 0 not in measured:
            out.append(0)
        left = space.size - len(measured) - len(out)
        if k - len(out) <= 0 or left <= 0:
            return out[:k]
        want = min(k - len(out), left)
        ok = {i: s for i, s in measured.items() if s is not None and math.isfinite(s) and s > 0}
        taken = set(measured) | set(out)
        if self.strategy != "random" and want < left:
            scan = [i for i in self._default_neighbours if i not in taken][:want]
            out += scan
            taken |= set(scan)
            want -= len(scan)
            if want <= 0:
                return out
        guided: list[int] = []
        if want < left and len(ok) >= _MIN_FOR_MODEL and self.strategy != "random":
            n_guided = want - max(1, want // 4)
            pool = self._pool(taken)
            if self.strategy == "xgb":
                guided = self._xgb_best(ok, pool, n_guided)
            else:
                guided = self._mutate_best(ok, taken, n_guided)
            self.used_model = self.used_model or bool(guided)
        taken |= set(guided)
        out += guided + self._random(taken, want - len(guided))
        return out

    def _pool(self, taken: set[int]) -> list[int]:
        """Unmeasured points to rank: all of them, or a large random sample of a huge space."""
        if self.space.size <= _ENUMERATE_LIMIT:
            return [i for i in range(self.space.size) if i not in taken]
        return self._random(taken, 4096)

    def _random(self, taken: set[int], n: int) -> list[int]:
        if n <= 0:
            return []
        size = self.space.size
        if size <= _ENUMERATE_LIMIT:
            free = np.asarray([i for i in range(size) if i not in taken], dtype=np.int64)
            return [int(i) for i in self.rng.permutation(free)[:n]]
        out: list[int] = []
        seen = set(taken)
        while len(out) < n and len(seen) < size:
            i = int(self.rng.integers(size))
            if i not in seen:
                seen.add(i)
                out.append(i)
        return out

    def _mutate_best(self, ok: dict[int, float], taken: set[int], n: int) -> list[int]:
        out: list[int] = []
        for best in sorted(ok, key=ok.get)[:3]:
            nb = [i for i in self.space.neighbours(best) if i not in taken and i not in out]
            out += [int(i) for i in self.rng.permutation(np.asarray(nb, dtype=np.int64))] if nb else []
        return out[:n]

    def _xgb_best(self, ok: dict[int, float], pool: list[int], n: int) -> list[int]:
        import xgboost as xgb  # noqa: PLC0415

        if not pool or n <= 0:
            return []
        idx = list(ok)
        xs = np.stack([self.space.features(i) for i in idx])
        best = min(ok.values())
        ys = np.asarray([best / ok[i] for i in idx], dtype=np.float32)  # throughput relative to the best: (0, 1]
        params = {"max_depth": 3, "eta": 0.3, "objective": "reg:squarederror", "nthread": 1,
                  "seed": int(self.rng.integers(2**31)), "verbosity": 0}
        model = xgb.train(params, xgb.DMatrix(xs, label=ys), num_boost_round=60)
        pred = model.predict(xgb.DMatrix(np.stack([self.space.features(i) for i in pool])))
        order = np.argsort(-pred, kind="stable")
        return [int(pool[j]) for j in order[:n]]
