"""The latency lookup table: measured entries, CSV round-trip, and the per-arch predictor.

Predicted latency of a detector (backbone Arch + Head) = stem + every block + FPN laterals + the
parts outside the backbone (FPN rest, RPN, RoI heads, transform, glue) at the Head's widths and
input size: a plain sum of the `ms` column (calibrated in-context values,
see `jdnas.latency.profile`; `isolated_ms` keeps each entry's timing on its own). A width that
is not on the table's grid (a pruned mid width, a slimmed stage) is interpolated linearly
between the nearest grid widths on each axis (FPN width, box-head width and proposal count
likewise); a width outside the grid's range, or an input size that was not profiled, is an
error, not a guess. With a `channel_block` above 1 an off-grid channel width is first rounded up
to a multiple of it: kernels that pack channels in blocks (onnxruntime's convolutions: 8) run a
width at the cost of the next whole block, a staircase that linear interpolation misses (the
onnxruntime table predicted every random validation detector too fast, 7-10% MAPE). The block
is a row of the table (`part` = channel_block, `cin` = the block), so a pinned table keeps it.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import fields
from functools import cached_property
from pathlib import Path
from typing import Iterable

from jdnas.errors import JdnasError, short
from jdnas.io import atomic_path
from jdnas.latency.grid import axes as _axes, family as _family, is_channel_axis, with_axis as _set
from jdnas.latency.space import HEAD_PARTS, Entry, arch_entries, head_entries
from jdnas.models.arch import Arch, Head

KEY_FIELDS = tuple(f.name for f in fields(Entry))
COLUMNS = KEY_FIELDS + ("ms", "isolated_ms", "settings")
BREAKDOWN = ("stem", "backbone", "fpn", "rpn", "roi_heads", "transform", "glue")
DECIMALS = 6  # milliseconds are written with this many decimals (a cached timing is read back at it)
MAX_MS = 3.6e6  # an entry above an hour is not a latency (a corrupt or hand-edited table)
MAX_KEY = 1 << 20  # widths, strides and sizes of an entry (the schema's bounds are far below)
MAX_TABLE_BYTES = 256 << 20  # a table of every entry of a large space is a few MB
BACKBONE_PARTS = ("stem", "block", "fpn_lateral")
CHANNEL_BLOCK = "channel_block"  # the row that keeps the table's channel block
# every part a table (or the profiler's cache, which also keeps end-to-end timings) holds
PARTS = BACKBONE_PARTS + HEAD_PARTS + ("e2e", CHANNEL_BLOCK)


class NotCovered(JdnasError):
    """An arch needs an entry the table neither holds nor can interpolate."""


class LatencyTable:
    """Milliseconds per entry on one device, with the settings each was measured under."""

    def __init__(self, ms: dict[Entry, float], settings: dict[Entry, str] | None = None, source: str = "table",
                 isolated: dict[Entry, float] | None = None, channel_block: int = 1):
        self.ms = dict(ms)
        self.channel_block = channel_block
        self.settings = dict(settings or {})
        self.isolated = dict(isolated or {})  # the timing of the entry on its own, where ms was calibrated
        self.source = source
        self._trace: set[Entry] | None = None  # see entries_used
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
            if self._trace is not None:
                self._trace.add(e)
            return self.ms[e]
        grid = self._grid.get(_family(e))
        if grid is None or depth > 8:
            raise NotCovered(f"{self.source}: no entry for {e}: profile a space that covers it")
        for axis, values in zip(_axes(e), grid):
            v = getattr(e, axis)
            if v in values:
                continue
            up = -(-v // self.channel_block) * self.channel_block
            if up != v and is_channel_axis(e, axis) and up <= max(values):
                return self._lookup(_set(e, axis, up), depth + 1)
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

    def entries_used(self, arch: Arch, head: Head | None = None) -> set[Entry]:
        """The table's entries the prediction of a detector reads (the grid neighbours of an
        interpolated width included)."""
        self._trace = set()
        try:
            self.predict(arch, head)
            return self._trace
        finally:
            self._trace = None

    def covers(self, arch: Arch, head: Head | None = None) -> bool:
        try:
            self.predict(arch, head)
        except NotCovered:
            return False
        return True

    # --- CSV ---------------------------------------------------------------------------
    def rows(self) -> Iterable[dict]:
        if self.channel_block > 1:
            yield {**{f: 0 for f in KEY_FIELDS}, "part": CHANNEL_BLOCK, "block": "", "cin": self.channel_block,
                   "ms": f"{0:.{DECIMALS}f}", "isolated_ms": "", "settings": ""}
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
    def load(cls, path: str | Path, check_settings: bool = True) -> "LatencyTable":
        """Read a table written by `save`, checked like data: one line naming the file, the line
        and the field for a file that is not a CSV table (binary, not UTF-8, missing or unknown
        columns), a bad value (an entry that is not a number, `ms` non-finite, negative outside
        the glue, or above an hour), an entry twice, or, with `check_settings`, a row timed
        under other settings than the rest of its kind (backbone parts share one settings hash,
        the parts outside the backbone another). The profiler's cache, which merges runs of
        several settings on purpose, is read with `check_settings=False`."""
        path = Path(path)
        if path.is_dir():
            raise JdnasError(f"{path}: is a directory, not a latency table (give the table.csv file)")
        if not path.is_file():
            if path.exists():
                raise JdnasError(f"{path}: not a regular file, not a latency table (give the table.csv file)")
            if path.is_symlink():
                raise JdnasError(f"{path}: a symbolic link that leads nowhere (dangling or a loop), not a latency "
                                 "table")
            raise JdnasError(f"{path}: latency table not found (run the profile_latency stage)")
        try:
            size = path.stat().st_size
            if size > MAX_TABLE_BYTES:
                raise JdnasError(f"{path}: {size:,} bytes: too large for a latency table (at most "
                                 f"{MAX_TABLE_BYTES:,})")
            data = path.read_bytes()
        except OSError as e:
            raise JdnasError(f"{path}: cannot read the latency table ({e.strerror or e})") from None
        if b"\0" in data:
            raise JdnasError(f"{path}: not a latency table (a binary file: NUL byte at offset {data.index(0)})")
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise JdnasError(f"{path}: not a latency table (not UTF-8 CSV text: byte 0x{data[e.start]:02x} at "
                             f"offset {e.start})") from None
        reader = csv.reader(io.StringIO(text, newline=""))
        try:
            header = next(reader, None)
            if not header:
                raise JdnasError(f"{path}: not a latency table (empty file; columns must be {', '.join(COLUMNS)})")
            cls._check_header(path, header)
            ms, settings, isolated, lines, block = {}, {}, {}, {}, 1
            for values in reader:
                n = reader.line_num
                if not values:
                    continue  # a blank line
                if len(values) != len(header):
                    raise JdnasError(f"{path}: line {n}: {len(values)} fields, expected {len(COLUMNS)}")
                row = dict(zip(header, values))
                e = cls._entry(path, n, row)
                if e.part == CHANNEL_BLOCK:
                    if not 1 <= e.cin <= 1024:
                        raise JdnasError(f"{path}: line {n}, field cin: a channel block of {e.cin} (1 to 1024)")
                    block = e.cin
                    continue
                if e in ms:
                    raise JdnasError(f"{path}: line {n}: {e} appears twice (also line {lines[e]})")
                ms[e] = _milliseconds(path, n, "ms", row["ms"], negative_ok=e.part == "glue")
                if row["isolated_ms"].strip():
                    isolated[e] = _milliseconds(path, n, "isolated_ms", row["isolated_ms"], negative_ok=False)
                settings[e], lines[e] = row["settings"], n
        except csv.Error as e:
            raise JdnasError(f"{path}: line {reader.line_num}: not a latency table (not CSV text: {e})") from None
        if not ms:
            raise JdnasError(f"{path}: a latency table with no entries (only its header): re-profile it")
        if check_settings:
            _check_settings(path, settings, lines)
        return cls(ms, settings, source=str(path), isolated=isolated, channel_block=block)

    @staticmethod
    def _check_header(path: Path, header: list[str]) -> None:
        names = [h.strip() for h in header]
        missing = [c for c in COLUMNS if c not in names]
        unknown = [h for h in names if h not in COLUMNS]
        twice = sorted({h for h in names if names.count(h) > 1})
        if missing or unknown or twice:
            what = "; ".join(x for x in (
                f"missing column{'s' * (len(missing) > 1)} {', '.join(missing)}" if missing else "",
                f"unknown column{'s' * (len(unknown) > 1)} {', '.join(short(u, 40) for u in unknown[:3])}"
                if unknown else "",
                f"column {', '.join(twice)} twice" if twice else "") if x)
            raise JdnasError(f"{path}: line 1: not a latency table ({what}; columns must be {', '.join(COLUMNS)})")
        header[:] = names

    @staticmethod
    def _entry(path: Path, n: int, row: dict[str, str]) -> Entry:
        """The entry a row keys, each key field checked."""
        part = row["part"].strip()
        if part not in PARTS:
            raise JdnasError(f"{path}: line {n}, field part: {short(row['part'], 40)} is not a part of a "
                             f"latency table (one of {', '.join(PARTS)})")
        ints = []
        for k in KEY_FIELDS[2:]:
            try:
                v = int(row[k])
            except ValueError:
                raise JdnasError(f"{path}: line {n}, field {k}: {short(row[k], 40)} is not an integer") from None
            if not 0 <= v <= MAX_KEY:
                raise JdnasError(f"{path}: line {n}, field {k}: {v} is out of range (0 to {MAX_KEY:,})")
            ints.append(v)
        return Entry(part, row["block"], *ints)


def _milliseconds(path: Path, n: int, field: str, text: str, negative_ok: bool) -> float:
    """A table cell in milliseconds: a finite number, >= 0 (the glue may be negative), at most an hour."""
    try:
        v = float(text)
    except ValueError:
        raise JdnasError(f"{path}: line {n}, field {field}: {short(text, 40)} is not a number") from None
    if not math.isfinite(v):
        raise JdnasError(f"{path}: line {n}, field {field}: {text.strip()} is not a finite number of milliseconds")
    if v < 0 and not negative_ok:
        raise JdnasError(f"{path}: line {n}, field {field}: {text.strip()} is negative (only the glue may be)")
    if abs(v) > MAX_MS:
        raise JdnasError(f"{path}: line {n}, field {field}: {text.strip()} ms is more than an hour"
                         + (" below zero" if v < 0 else "") + f" ({MAX_MS:.0f} ms): not a latency")
    return v


def _check_settings(path: Path, settings: dict[Entry, str], lines: dict[Entry, int]) -> None:
    """Every backbone row under one settings hash, every other row under one (the head's): a row of
    another hash than the rest of its kind was timed under other conditions (device, clock,
    threads, runs, head config) and would mix two machines' milliseconds in one prediction."""
    for kind, parts in (("backbone", BACKBONE_PARTS), ("head", HEAD_PARTS + ("e2e",))):
        rows = sorted((lines[e], s) for e, s in settings.items() if e.part in parts)
        if not rows:
            continue
        counts: dict[str, int] = {}
        for _, s in rows:
            counts[s] = counts.get(s, 0) + 1
        if len(counts) == 1:
            continue
        rest = max(counts, key=lambda s: (counts[s], -next(n for n, x in rows if x == s)))
        n, odd = next((n, s) for n, s in rows if s != rest)
        raise JdnasError(f"{path}: line {n}, field settings: {short(odd, 40)} differs from the settings "
                         f"{short(rest, 40)} of the table's other {counts[rest]} {kind} rows: entries timed under "
                         "other conditions (device, clock, runs, head) were mixed in: re-profile the table")
