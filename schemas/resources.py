"""What runs ask for and what agents offer: the one rule of fit both sides apply.

A run asks for ``cpus``, ``memory_limit_mb`` and ``gpus`` (SubmitRun, LaunchRun); an agent
declares ``cpus``, ``memory_mb`` and ``gpus`` (AgentHeartbeat). The agent takes a run only
while its free capacity has room for it; the control plane refuses a submission that no live
agent of its queue could ever take. Both read the fields by the rule below, and say why in
the same words:

- a run that does not ask for a dimension counts 0 of it;
- an agent's dimension that is None is not counted (anything fits); GPUs are always counted,
  so a run asking for a GPU never fits an agent that declares none.

CPUs are counted in nano-CPUs, Docker's unit, so that fractions add up exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Nano-CPUs in one CPU.
NANO = 1_000_000_000


def nano_cpus(cpus: float | None) -> int:
    """CPUs as Docker's nano-CPUs (0: none asked for)."""
    return round(cpus * NANO) if cpus else 0


#: The dimensions, by the name of a run's field for each.
FIELDS = ("cpus", "memory_limit_mb", "gpus")


def amount(field: str, value: int) -> str:
    """One dimension's amount in words; CPUs in nano-CPUs ("1.5 CPUs", "1 GPU", "64 MB")."""
    if field == "cpus":
        cpus = value / NANO
        return f"{cpus:g} CPU" if cpus == 1 else f"{cpus:g} CPUs"
    if field == "gpus":
        return f"{value} GPU" if value == 1 else f"{value} GPUs"
    return f"{value} MB of memory"


@dataclass(frozen=True)
class Resources:
    """What one run asks for, or what several hold together."""

    nano_cpus: int = 0
    memory_mb: int = 0
    gpus: int = 0

    @classmethod
    def asked(cls, cpus: float | None, memory_mb: int | None, gpus: int) -> Resources:
        """From a run's fields: ``cpus``, ``memory_limit_mb`` and ``gpus``."""
        return cls(nano_cpus(cpus), memory_mb or 0, gpus)

    def __add__(self, other: Resources) -> Resources:
        return Resources(
            self.nano_cpus + other.nano_cpus,
            self.memory_mb + other.memory_mb,
            self.gpus + other.gpus,
        )

    def amounts(self) -> tuple[int, int, int]:
        """Its dimensions in the order of ``FIELDS``."""
        return (self.nano_cpus, self.memory_mb, self.gpus)

    def __bool__(self) -> bool:
        """Whether it asks for anything at all."""
        return bool(self.nano_cpus or self.memory_mb or self.gpus)

    def words(self) -> str:
        """ "2 CPUs, 512 MB of memory and 1 GPU" (what it asks for; "nothing" for nothing)."""
        parts = [
            amount(field, value)
            for field, value in zip(FIELDS, self.amounts(), strict=True)
            if value
        ]
        if not parts:
            return "nothing"
        return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"


@dataclass(frozen=True)
class Shortfall:
    """The first dimension a run does not fit in: its field, what it asks, what is offered
    in all and what is free of it (amounts as ``Resources`` counts them)."""

    field: str
    asked: int
    offered: int
    free: int

    @property
    def asked_words(self) -> str:
        return amount(self.field, self.asked)

    @property
    def offered_words(self) -> str:
        return amount(self.field, self.offered)

    @property
    def free_words(self) -> str:
        return amount(self.field, max(0, self.free))


@dataclass(frozen=True)
class Capacity:
    """What an agent offers in all; None: that dimension is not counted."""

    cpus: float | None = None
    memory_mb: int | None = None
    gpus: int = 0

    def offered(self, field: str) -> int | None:
        """What it offers of one dimension (CPUs in nano-CPUs); None: not counted."""
        if field == "cpus":
            return nano_cpus(self.cpus) if self.cpus is not None else None
        return self.memory_mb if field == "memory_limit_mb" else self.gpus

    def lacks(self, need: Resources, held: Resources | None = None) -> Shortfall | None:
        """The first dimension in which ``need``, on top of ``held``, is more than this
        capacity offers; None when it fits (with ``held`` None: it fits an idle agent)."""
        held = held or Resources()
        for field, asked, taken in zip(FIELDS, need.amounts(), held.amounts(), strict=True):
            offered = self.offered(field)
            if offered is not None and asked and taken + asked > offered:
                return Shortfall(field, asked, offered, offered - taken)
        return None

    def words(self) -> str:
        """ "2 CPUs, memory not counted, no GPU"."""
        cpus = self.offered("cpus")
        return ", ".join(
            (
                amount("cpus", cpus) if cpus is not None else "CPUs not counted",
                amount("memory_limit_mb", self.memory_mb)
                if self.memory_mb is not None
                else "memory not counted",
                amount("gpus", self.gpus) if self.gpus else "no GPU",
            )
        )
