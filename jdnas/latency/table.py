"""The latency lookup table: measured entries, CSV round-trip, and the per-arch predictor.

Predicted latency of a detector (backbone Arch + Head) = stem + every block + FPN laterals + the
parts outside the backbone (FPN rest, RPN, RoI heads, transform, glue) at the Head's widths and
input size: a plain sum of the `ms` column (calibrated in-context values,
see `jdnas.latency.profile`; `isolated_ms` keeps each entry's timing on its own). A width that
is not on the table's grid (a pruned mid width, a slimmed stage) is interpolated linearly
between the nearest grid widths on each axis (FPN width, box-head width and proposal count
likewise); a width outside the grid's range, or an input size that was not profiled, is an
error, not a guess.
"""
from __future__ import annotations

import csv
import math
from dataclasses import fields, replace
from functools import cached_property
from pathlib import Path
from typing import Iterable

from jdnas.errors import JdnasError
from jdnas.io import atomic_path
from jdnas.latency.grid import axes as _axes, family as _family, with_axis as _set
from jdnas.latency.space import Entry, arch_entries, head_entries
from jdnas.models.arch import Arch, Head

KEY_FIELDS = tuple(f.name for f in fields(Entry))
COLUMNS = KEY_FIELDS + ("ms", "isolated_ms", "settings")
BREAKDOWN = ("stem", "backbone", "fpn", "rpn", "roi_heads", "transform", "glue")
DECIMALS = 6  # milliseconds are written with this many decimals (a cached timing is read back at it)


class NotCovered(JdnasError):
    """An arch needs an entry the table neither holds nor can interpolate."""


class LatencyTable:
    """Milliseconds per entry on one device, with the settings each was measured under."""

    def __init__(self, ms: dict[Entry, float], settings: dict[Entry, str] | None = None, source: str = "table",
                 isolated: dict[Entry, float] | None = None):
        self.ms = dict(ms)
        self.settings = dict(settings or {})
        self.isolated = dict(isolated or {})  # the timing of the entry on its own, where ms was calibrated
        self.source = source
        self._grid: dict[tuple, list[set[int]]] = {}
        for e in self.ms:
            axes = _axes(e)
            grid = self._grid.setdefault(_family(e), [set() for _ in axes])
            for values, axis in zip(grid, axes):
                values.add(getattr(e, axis))

    def __len__(self) -> int:
        return len(self.ms)

    # --- lookup ------------------------------------------------------------------------
    def lookup(self, e: Entry) -> float:
        """Milliseconds of `e`: measured, or interpolated between grid widths."""
        return self._lookup(e, depth=0)

    def _lookup(self, e: Entry, depth: int) -> float:
        if e in self.ms:
            return self.ms[e]
        grid = self._grid.get(_family(e))
        if grid is None or depth > 8:
            raise NotCovered(f"{self.source}: no entry for {e}: profile a space that covers it")
        for axis, values in zip(_axes(e), grid):
            v = getattr(e, axis)
            if v in values:
                continue
            lo = max((x for x in values if x < v), default=None)
            hi = min((x for x in values if x > v), default=None)
            if lo is None or hi is None:
                raise NotCovered(f"{self.source}: {e}: {axis} = {v} is outside the profiled range "
                                 f"[{min(values)}, {max(values)}]: profile a wider space")
            t = (v - lo) / (hi - lo)
            return (1 - t) * self._lookup(_set(e, axis, lo), depth + 1) + t * self._lookup(_set(e, axis, hi), depth + 1)
        raise NotCovered(f"{self.source}: no entry for {e} (its widths are on the grid, the combination is not)")

    @cached_property
    def base_head(self) -> Head:
        """The largest head the table covers (the base's): every head axis at its maximum."""
        trans = [e for e in self.ms if e.part == "transform"]
        roi = [e for e in self.ms if e.part == "roi_heads"]
        if not trans or not roi:
            raise NotCovered(f"{self.source}: no transform / roi_heads entries: not a detector latency table")
        size = max(trans, key=lambda e: (e.cin, e.cout))
        return Head(max(e.cin for e in roi), max(e.hidden for e in roi), size.cin, size.cout, max(e.mid for e in roi))

    def input_hw(self, head: Head | None = None) -> tuple[int, int]:
        """The network input size (height, width) of a head's min_size/max_size, as profiled."""
        head = head or self.base_head
        if (head.min_size, head.max_size) in self._input_sizes:
            return self._input_sizes[head.min_size, head.max_size]
        sizes = sorted(self._input_sizes, reverse=True)
        raise NotCovered(f"{self.source}: input size {head.min_size}/{head.max_size} was not profiled "
                         f"(profiled min/max sizes: {', '.join(f'{a}/{b}' for a, b in sizes)})")

    @cached_property
    def _input_sizes(self) -> dict[tuple[int, int], tuple[int, int]]:
        """(min_size, max_size) -> network input (height, width), from the transform entries."""
        return {(e.cin, e.cout): (e.height, e.width) for e in self.ms if e.part == "transform"}

    @cached_property
    def _classes(self) -> int:
        return next(e.cout for e in self.ms if e.part == "roi_heads")

    # --- prediction --------------------------------------------------------------------
    def breakdown(self, arch: Arch, head: Head | None = None) -> dict[str, float]:
        """Predicted milliseconds per part of the detector (see BREAKDOWN) and their total;
        `head` defaults to the base's."""
        head = head or self.base_head
        hw = self.input_hw(head)
        parts = dict.fromkeys(BREAKDOWN, 0.0)
        for e in arch_entries(arch, hw, head.fpn) + head_entries(hw, head, self._classes):
            key = {"stem": "stem", "block": "backbone", "fpn_lateral": "fpn", "fpn_top": "fpn"}.get(e.part, e.part)
            parts[key] += self.lookup(e)
        parts["total"] = sum(parts[k] for k in BREAKDOWN)
        return parts

    def predict(self, arch: Arch, head: Head | None = None) -> float:
        """Predicted end-to-end latency of a detector with backbone `arch` and `head`, in milliseconds."""
        return self.breakdown(arch, head)["total"]

    def covers(self, arch: Arch, head: Head | None = None) -> bool:
        try:
            self.predict(arch, head)
        except NotCovered:
            return False
        return True

    # --- CSV ---------------------------------------------------------------------------
    def rows(self) -> Iterable[dict]:
        for e in sorted(self.ms):
            iso = self.isolated.get(e)
            yield {**{f: getattr(e, f) for f in KEY_FIELDS}, "ms": f"{self.ms[e]:.{DECIMALS}f}",
                   "isolated_ms": "" if iso is None else f"{iso:.{DECIMALS}f}", "settings": self.settings.get(e, "")}

    def save(self, path: str | Path) -> None:
        """Write the table as CSV (sorted rows), atomically."""
        with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, COLUMNS)
            w.writeheader()
            w.writerows(self.rows())

    @classmethod
    def load(cls, path: str | Path) -> "LatencyTable":
        """Read a table written by `save`; a clear error if the file is missing or malformed."""
        path = Path(path)
        if not path.is_file():
            raise JdnasError(f"{path}: latency table not found (run the profile_latency stage)")
        try:
            with path.open(newline="", encoding="utf-8") as f:
                rows = list(csv.reader(f))
        except (UnicodeDecodeError, csv.Error) as e:
            raise JdnasError(f"{path}: not a latency table (not CSV text: {e})") from None
        if not rows or tuple(rows[0]) != COLUMNS:
            raise JdnasError(f"{path}: not a latency table (columns must be {', '.join(COLUMNS)})")
        ms, settings, isolated = {}, {}, {}
        for n, values in enumerate(rows[1:], start=2):
            if len(values) != len(COLUMNS):
                raise JdnasError(f"{path}: line {n}: {len(values)} fields, expected {len(COLUMNS)}")
            row = dict(zip(COLUMNS, values))
            try:
                e = Entry(row["part"], row["block"], *(int(row[k]) for k in KEY_FIELDS[2:]))
                value = float(row["ms"])
                if not math.isfinite(value) or (value < 0 and e.part != "glue"):
                    raise ValueError(f"ms = {row['ms']} must be finite and >= 0")
                if e in ms:
                    raise ValueError(f"{e} appears twice")
                ms[e] = value
                if row["isolated_ms"]:
                    isolated[e] = float(row["isolated_ms"])
            except (ValueError, TypeError) as err:
                raise JdnasError(f"{path}: line {n}: {err}") from None
            settings[e] = row["settings"]
        return cls(ms, settings, source=str(path), isolated=isolated)
