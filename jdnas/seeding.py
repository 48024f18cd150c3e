"""Seeds derived from the params seed and a path of keys: the one place random streams are split."""
from __future__ import annotations

import hashlib


def derive_seed(seed: int, *keys: object) -> int:
    """A seed in [0, 2**31) for (seed, *keys): the same keys give the same seed on every machine,
    different keys independent streams (no hand-picked mixing constants)."""
    text = "/".join(map(str, (seed, *keys)))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") >> 1


# Per-iteration streams drawn every training step, where hashing each step would cost time; their
# multipliers are fixed (changing one changes every trained supernet and jittered fine-tune).
STEP_STREAMS = {"sandwich": 1_000_003, "scale jitter": 7_919}


def step_seed(seed: int, it: int, stream: str) -> int:
    """The seed of iteration `it` of a per-step random stream (see STEP_STREAMS)."""
    return seed * STEP_STREAMS[stream] + it
