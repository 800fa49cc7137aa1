"""Non-finite steps on demand, for the tests of the non-finite guard.

Every registered method is replaced by a subclass whose loss is NaN at the chosen optimizer steps, as a diverging
step would make it. The production loop runs unchanged (a method enters through the registry, so a test's method
does too); ``nonfinite_train.py`` does the same for processes started by torchrun.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

from torch import Tensor

from ssltrain.methods import METHODS, Method


def _poisoned(cls: type[Method], steps: frozenset[int]) -> type[Method]:
    class Poisoned(cls):  # type: ignore[valid-type,misc]
        def on_step_start(self, step: int, total_steps: int) -> None:
            super().on_step_start(step, total_steps)
            self.poison = step in steps

        def forward(self, views: object) -> dict[str, Tensor]:
            out = super().forward(views)
            if getattr(self, "poison", False):
                out = {**out, "loss": out["loss"] * float("nan")}
            return out

    Poisoned.__name__ = Poisoned.__qualname__ = cls.__name__
    return Poisoned


@contextlib.contextmanager
def nonfinite_at(steps: Iterable[int]) -> Iterator[None]:
    """While active, every method's loss is NaN at ``steps`` (0-based optimizer steps)."""
    at, saved = frozenset(steps), dict(METHODS)
    METHODS.update({name: _poisoned(cls, at) for name, cls in saved.items()})
    try:
        yield
    finally:
        METHODS.clear()
        METHODS.update(saved)
