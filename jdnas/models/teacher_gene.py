"""A teacher pool member as a genome (DESIGN §6, §8): depth and mid-width ratio per stage.

The genome is what the search mutates and records; `jdnas.joint.distill.Teacher` is the frozen
detector built from it (`jdnas.joint.teacher_pool.TeacherPool.teacher(gene.arch(space))`).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from jdnas.models.arch import Arch
from jdnas.models.elastic import PoolSpace


@dataclass(frozen=True)
class TeacherGene:
    """Depth and mid-width ratio per stage of a pool member (stable under mutation)."""

    depths: tuple[int, ...]
    ratios: tuple[float, ...]

    def arch(self, space: PoolSpace) -> Arch:
        return space.member(self.depths, list(self.ratios))

    def __str__(self) -> str:
        return "d" + ",".join(map(str, self.depths)) + "/w" + ",".join(f"{r:g}" for r in self.ratios)

    @classmethod
    def parse(cls, text: str) -> "TeacherGene":
        d, w = text[1:].split("/w")
        return cls(tuple(int(x) for x in d.split(",")), tuple(float(x) for x in w.split(",")))


def largest_gene(space: PoolSpace) -> TeacherGene:
    """The pool's largest member."""
    return TeacherGene(space.max_arch.depths, (1.0,) * len(space.max_arch.stages))


def sample_gene(space: PoolSpace, rng: random.Random) -> TeacherGene:
    """A member drawn uniformly per stage."""
    n = len(space.max_arch.stages)
    return TeacherGene(tuple(rng.choice(space.depth_choices(s)) for s in range(n)),
                       tuple(rng.choice(space.width_choices()) for _ in range(n)))


def mutate_gene(t: TeacherGene, space: PoolSpace, rng: random.Random) -> TeacherGene:
    """Change one dimension (one stage's depth or mid-width ratio) to another allowed value."""
    options = []
    for s in range(len(t.depths)):
        options += [("depth", s, d) for d in space.depth_choices(s) if d != t.depths[s]]
        options += [("ratio", s, r) for r in space.width_choices() if r != t.ratios[s]]
    if not options:
        return t
    kind, s, value = rng.choice(options)
    depths, ratios = list(t.depths), list(t.ratios)
    (depths if kind == "depth" else ratios)[s] = value
    return TeacherGene(tuple(depths), tuple(ratios))
