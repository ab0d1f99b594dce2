"""A tiny registry per method family: adding a method is one decorated function or class."""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from attar.errors import AttarError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> object map filled by a decorator; unknown names list the known ones."""

    def __init__(self, family: str):
        self.family = family
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.family} {name!r} registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "(none)"
            raise AttarError(f"Unknown {self.family} {name!r}. Known {self.family}s: {known}.") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
