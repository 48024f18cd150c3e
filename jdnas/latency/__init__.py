"""Latency lookup table (DESIGN §9): profile each distinct block configuration of the search
space once per device, predict any arch's detector latency as the sum of its entries."""
from jdnas.latency.space import Entry, LatencySpace, arch_entries, space_entries, spaces_from_params
from jdnas.latency.table import BREAKDOWN, LatencyTable, NotCovered

__all__ = ["Entry", "LatencySpace", "LatencyTable", "NotCovered", "BREAKDOWN", "arch_entries",
           "space_entries", "spaces_from_params", "profile_latency", "table_dir"]


def __getattr__(name: str):
    # the stage pulls in torchvision's detector and matplotlib: import it only when asked
    if name in ("profile_latency", "table_dir"):
        from jdnas.latency import profile
        return getattr(profile, name)
    raise AttributeError(name)
