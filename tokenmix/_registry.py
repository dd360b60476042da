"""The name -> object registry behind every pluggable part: kernel generators, mixer presets,
models and backends.

Names list in registration order (for backends, the dispatch priority; ``first=True`` puts an
entry ahead of the others). A taken name is refused unless it is bound again to the same object
or ``overwrite=True``; an unknown name is a ValueError that lists the known ones. It is a dict,
so tests can snapshot and restore it.
"""

from __future__ import annotations

from typing import Any, List

_DECORATE = object()


class Registry(dict):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str, obj: Any = _DECORATE, *, overwrite: bool = False, first: bool = False):
        """Register ``obj`` under ``name`` and return it; without ``obj``, a decorator that
        registers its argument."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty str, got {name!r}")
        if obj is _DECORATE:
            return lambda o: self.register(name, o, overwrite=overwrite, first=first)
        if name in self and self[name] is not obj and not overwrite:
            raise ValueError(f"{self.kind} {name!r} is already registered to {self[name]!r} "
                             f"(pass overwrite=True to replace it)")
        self.pop(name, None)
        if first:
            rest = dict(self)
            self.clear()
            self[name] = obj
            self.update(rest)
        else:
            self[name] = obj
        return obj

    def names(self) -> List[str]:
        """The registered names, in registration order."""
        return list(self)

    def lookup(self, name: str) -> Any:
        """The object registered as ``name``; ValueError listing the known names otherwise."""
        if not isinstance(name, str) or name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(self)}")
        return self[name]
