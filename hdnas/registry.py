"""One ``Registry`` class for every name -> object table of the package (candidate ops, mixed-op
backends, DARTS candidates): registering a name twice is an error, and an unknown name raises
the registry's own error class listing the known names. Imports nothing of hdnas."""
from __future__ import annotations

from typing import Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object mapping that refuses duplicates. ``what`` names the entries in errors
    ("op", "backend"); ``error`` is the exception raised for an unknown name or a duplicate."""

    def __init__(self, what: str, error: type[Exception] = KeyError):
        self.what = what
        self.error = error
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T) -> T:
        if not isinstance(name, str) or not name:
            raise self.error(f"a {self.what} needs a non-empty string name, got {name!r}")
        if name in self._items:
            raise self.error(f"{self.what} {name!r} is already registered")
        self._items[name] = obj
        return obj

    def unregister(self, name: str) -> T:
        """Remove ``name`` (for tests and plug-ins that register temporarily)."""
        try:
            return self._items.pop(name)
        except KeyError:
            raise self.error(f"unknown {self.what} {name!r}") from None

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise self.error(f"unknown {self.what} {name!r}; known: "
                             f"{', '.join(sorted(self._items))}") from None

    __getitem__ = get

    def __contains__(self, name) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def names(self) -> list[str]:
        return list(self._items)

    def values(self):
        return self._items.values()

    def items(self):
        return self._items.items()

    def __repr__(self) -> str:
        return f"Registry({self.what}: {', '.join(self._items)})"
