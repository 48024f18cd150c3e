"""The interpolation grid of latency entries: which widths of an entry may be interpolated and
which entries share a grid. Below both the table (which interpolates on it) and the space
(which completes it), so neither imports the other for it."""
from __future__ import annotations

from dataclasses import fields, replace
from functools import cache
from itertools import product
from typing import Any


def axes(e: Any) -> tuple[str, ...]:
    """The width fields of an entry that may be interpolated."""
    if e.part == "stem":
        return ("cout",)
    if e.part == "fpn_lateral":
        return ("cin", "cout")
    if e.part == "fpn_top":
        return ("cout",)
    if e.part == "rpn":
        return ("cin",)
    if e.part == "roi_heads":
        return ("cin", "mid", "hidden")
    if e.part == "block":
        return ("cin", "mid") if _same_width(e) else ("cin", "mid", "cout")
    return ()


def is_channel_axis(e: Any, axis: str) -> bool:
    """Whether an interpolation axis of `e` is a channel width (every one but the RoI heads'
    proposal count)."""
    return not (e.part == "roi_heads" and axis == "mid")


def _same_width(e: Any) -> bool:
    """A block without projection (cin == cout, stride 1): cin and cout move together."""
    return e.cin == e.cout and e.stride == 1


def family(e: Any) -> tuple:
    """Entries that differ only on their interpolation axes belong to one family."""
    skip = set(axes(e)) | ({"cout"} if e.part == "block" and _same_width(e) else set())
    return tuple(getattr(e, f) for f in _names(type(e)) if f not in skip) + (_same_width(e) if e.part == "block" else None,)


@cache
def _names(kind: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(kind))


def with_axis(e: Any, axis: str, value: int) -> Any:
    """The entry with one interpolation axis set (a same-width block moves cin and cout together)."""
    if e.part == "block" and _same_width(e) and axis == "cin":
        return replace(e, cin=value, cout=value)
    return replace(e, **{axis: value})


def complete_grid(entries: set) -> set:
    """The entries plus every combination of their interpolation axes' values within each family
    (entries that differ only in widths): two stages at two input sizes can share a family (the
    same resolution), and interpolation needs the whole product of its grid."""
    families: dict[tuple, list] = {}
    for e in entries:
        families.setdefault(family(e), []).append(e)
    out = set(entries)
    for members in families.values():
        names = axes(members[0])
        if not names:
            continue
        values = [sorted({getattr(e, a) for e in members}) for a in names]
        for combo in product(*values):
            e = members[0]
            for a, v in zip(names, combo):
                e = with_axis(e, a, v)
            out.add(e)
    return out
