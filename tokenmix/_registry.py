"""A name -> object registry shared by the kernel generators and the mixer presets.

It is a plain dict (so tests can snapshot and restore it) with a decorator that refuses
to rebind a taken name and a lookup whose error lists the known names.
"""

from __future__ import annotations

from typing import Callable, List, TypeVar

T = TypeVar("T")


class Registry(dict):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering its argument under ``name``; re-registering the same object
        is a no-op, binding a taken name to another object raises ValueError."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty str, got {name!r}")

        def deco(obj: T) -> T:
            if name in self and self[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered to {self[name]!r}")
            self[name] = obj
            return obj

        return deco

    def lookup(self, name: str, known: List[str]):
        """The object registered as ``name``; ValueError listing ``known`` otherwise."""
        if not isinstance(name, str) or name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(known)}")
        return self[name]
