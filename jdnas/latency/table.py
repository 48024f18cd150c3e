"""The latency lookup table: measured entries, CSV round-trip, and the per-arch predictor.

Predicted latency of an Arch = stem + every block + FPN laterals + the fixed parts (FPN rest,
RPN, RoI heads, transform, glue): a plain sum of the `ms` column (calibrated in-context values,
see `jdnas.latency.profile`; `isolated_ms` keeps each entry's timing on its own). A width that
is not on the table's grid (a pruned mid width, a slimmed stage) is interpolated linearly
between the nearest grid widths on each axis; a width outside the grid's range is an error,
not a guess.
"""
from __future__ import annotations

import csv
from dataclasses import fields, replace
from pathlib import Path
from typing import Iterable

from jdnas.errors import JdnasError
from jdnas.io import atomic_path
from jdnas.latency.space import HEAD_PARTS, Entry, arch_entries
from jdnas.models.arch import Arch

KEY_FIELDS = tuple(f.name for f in fields(Entry))
COLUMNS = KEY_FIELDS + ("ms", "isolated_ms", "settings")
BREAKDOWN = ("stem", "backbone", "fpn", "rpn", "roi_heads", "transform", "glue")


class NotCovered(JdnasError):
    """An arch needs an entry the table neither holds nor can interpolate."""


def _axes(e: Entry) -> tuple[str, ...]:
    """The width fields of an entry that may be interpolated."""
    if e.part == "stem":
        return ("cout",)
    if e.part == "fpn_lateral":
        return ("cin",)
    if e.part == "block":
        return ("cin", "mid") if _same_width(e) else ("cin", "mid", "cout")
    return ()


def _same_width(e: Entry) -> bool:
    """A block without projection (cin == cout, stride 1): cin and cout move together."""
    return e.cin == e.cout and e.stride == 1


def _family(e: Entry) -> tuple:
    """Entries that differ only on their interpolation axes belong to one family."""
    skip = set(_axes(e)) | ({"cout"} if e.part == "block" and _same_width(e) else set())
    return tuple(getattr(e, f) for f in KEY_FIELDS if f not in skip) + (_same_width(e) if e.part == "block" else None,)


def _set(e: Entry, axis: str, value: int) -> Entry:
    if e.part == "block" and _same_width(e) and axis == "cin":
        return replace(e, cin=value, cout=value)
    return replace(e, **{axis: value})


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

    def head(self, part: str, input_hw: tuple[int, int] | None = None) -> Entry:
        """The table's entry for a fixed part (one per input size)."""
        found = [e for e in self.ms if e.part == part and (input_hw is None or self._input_hw(e) == tuple(input_hw))]
        if len(found) != 1:
            what = "no" if not found else "several"
            raise NotCovered(f"{self.source}: {what} '{part}' entries{f' for input {input_hw}' if input_hw else ''}"
                             f"{': pass the input size' if found else ''}")
        return found[0]

    @staticmethod
    def _input_hw(e: Entry) -> tuple[int, int]:
        if e.part == "fpn_top":  # keyed by the C2 resolution: input / 4
            return e.height * 4, e.width * 4
        return e.height, e.width

    @property
    def input_hw(self) -> tuple[int, int]:
        """The network input size the table was profiled at (when it holds one)."""
        return self._input_hw(self.head("transform"))

    # --- prediction --------------------------------------------------------------------
    def breakdown(self, arch: Arch, input_hw: tuple[int, int] | None = None) -> dict[str, float]:
        """Predicted milliseconds per part of the detector (see BREAKDOWN) and their total."""
        hw = tuple(input_hw) if input_hw else self.input_hw
        heads = {p: self.head(p, hw) for p in HEAD_PARTS}
        parts = dict.fromkeys(BREAKDOWN, 0.0)
        for e in arch_entries(arch, hw, heads["rpn"].cin):
            key = {"stem": "stem", "block": "backbone", "fpn_lateral": "fpn"}[e.part]
            parts[key] += self.lookup(e)
        parts["fpn"] += self.ms[heads["fpn_top"]]
        for p in ("rpn", "roi_heads", "transform", "glue"):
            parts[p] += self.ms[heads[p]]
        parts["total"] = sum(parts[k] for k in BREAKDOWN)
        return parts

    def predict(self, arch: Arch, input_hw: tuple[int, int] | None = None) -> float:
        """Predicted end-to-end latency of a detector with backbone `arch`, in milliseconds."""
        return self.breakdown(arch, input_hw)["total"]

    def covers(self, arch: Arch, input_hw: tuple[int, int] | None = None) -> bool:
        try:
            self.predict(arch, input_hw)
        except NotCovered:
            return False
        return True

    # --- CSV ---------------------------------------------------------------------------
    def rows(self) -> Iterable[dict]:
        for e in sorted(self.ms):
            iso = self.isolated.get(e)
            yield {**{f: getattr(e, f) for f in KEY_FIELDS}, "ms": f"{self.ms[e]:.6f}",
                   "isolated_ms": "" if iso is None else f"{iso:.6f}", "settings": self.settings.get(e, "")}

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
        ms, settings, isolated = {}, {}, {}
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if tuple(reader.fieldnames or ()) != COLUMNS:
                raise JdnasError(f"{path}: not a latency table (columns must be {', '.join(COLUMNS)})")
            for n, row in enumerate(reader, start=2):
                try:
                    e = Entry(row["part"], row["block"], *(int(row[k]) for k in KEY_FIELDS[2:]))
                    ms[e] = float(row["ms"])
                    if row["isolated_ms"]:
                        isolated[e] = float(row["isolated_ms"])
                except ValueError as err:
                    raise JdnasError(f"{path}: line {n}: {err}") from None
                settings[e] = row["settings"]
        return cls(ms, settings, source=str(path), isolated=isolated)
