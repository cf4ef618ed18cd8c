"""Named axes over worker ranks: which rank sits at which (dp, pp, tp, ...) coordinate."""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Sequence
from typing import Any

__all__ = ["NamedSharding"]


class NamedSharding:
    """An N-dimensional arrangement of ranks ``0..N-1`` with a name per axis.

    >>> s = NamedSharding(layout=[[0, 1], [2, 3]], names=["dp", "tp"])
    >>> s.shape
    {'dp': 2, 'tp': 2}
    >>> s.get_worker_coords(3)
    {'dp': 1, 'tp': 1}
    >>> s.get_ranks(dp=1).layout
    [2, 3]
    >>> s.get_ranks(dp=1, tp=0)
    2
    """

    def __init__(self, layout: Sequence[Any], names: Sequence[str]) -> None:
        if hasattr(layout, "tolist"):  # a numpy array
            layout = layout.tolist()
        names = list(names)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"names must be a non-empty list of non-empty strings, not {names!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"axis names must be unique: {names}")
        dims = _shape(layout)
        if len(dims) != len(names):
            raise ValueError(f"the layout has {len(dims)} dimensions but {len(names)} names were given ({names})")
        self._names = names
        self._dims = dims
        self._layout = _copy(layout)
        self._coords: dict[int, tuple[int, ...]] = {}
        for coords in itertools.product(*(range(d) for d in dims)):
            rank = self._at(coords)
            if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
                raise ValueError(f"ranks must be ints; found {rank!r} at {coords}")
            rank = int(rank)
            if rank in self._coords:
                raise ValueError(f"rank {rank} appears twice in the layout (at {self._coords[rank]} and {coords})")
            self._coords[rank] = coords
        missing = sorted(set(range(len(self._coords))) - set(self._coords))
        if missing:
            raise ValueError(f"ranks must be 0..{len(self._coords) - 1}; missing {missing}")

    def _at(self, coords: Sequence[int]) -> Any:
        node: Any = self._layout
        for c in coords:
            node = node[c]
        return node

    @property
    def names(self) -> list[str]:
        return list(self._names)

    @property
    def shape(self) -> dict[str, int]:
        return dict(zip(self._names, self._dims, strict=True))

    @property
    def ndim(self) -> int:
        return len(self._names)

    @property
    def size(self) -> int:
        return len(self._coords)

    @property
    def layout(self) -> list[Any]:
        return _copy(self._layout)

    def get_axis_index(self, name: str) -> int:
        self._check_axis(name)
        return self._names.index(name)

    def get_axis_size(self, name: str) -> int:
        return self._dims[self.get_axis_index(name)]

    def _check_axis(self, name: str) -> None:
        if name not in self._names:
            raise ValueError(f"unknown axis {name!r}; the axes are {self._names}")

    def get_worker_coords(self, rank: int) -> dict[str, int]:
        """``{axis: index}`` of ``rank``."""
        coords = self._coords.get(rank)
        if coords is None:
            raise ValueError(f"rank {rank!r} is not in this layout (ranks 0..{self.size - 1})")
        return dict(zip(self._names, coords, strict=True))

    def get_ranks(self, **coords: int) -> NamedSharding | int:
        """The sub-layout at the given coordinates (a rank, once every axis is given)."""
        index: list[Any] = [slice(None)] * self.ndim
        for name, i in coords.items():
            self._check_axis(name)
            axis = self._names.index(name)
            if isinstance(i, bool) or not isinstance(i, numbers.Integral):  # numpy's integers too
                raise TypeError(f"the index for axis {name!r} must be an int, not {i!r}")
            if not 0 <= i < self._dims[axis]:
                raise ValueError(f"index {i!r} is out of range for axis {name!r} of size {self._dims[axis]}")
            index[axis] = int(i)
        sub = _select(self._layout, index)
        rest = [n for n in self._names if n not in coords]
        if not rest:
            return sub
        return _Sub(sub, rest)

    def get_ranks_by_coord(self, **coords: int) -> list[int]:
        """Every rank matching the given coordinates (other axes free), sorted."""
        for name in coords:
            self._check_axis(name)
        want = {self._names.index(n): i for n, i in coords.items()}
        return sorted(r for r, c in self._coords.items() if all(c[a] == i for a, i in want.items()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NamedSharding) and other._names == self._names and other._layout == self._layout

    def __hash__(self) -> int:
        return hash((tuple(self._names), repr(self._layout)))

    def __repr__(self) -> str:
        return f"NamedSharding(names={self._names}, shape={tuple(self._dims)}, layout={self._layout})"


class _Sub(NamedSharding):
    """A sub-layout: its ranks keep their global numbers (no 0..N-1 rule)."""

    def __init__(self, layout: list[Any], names: list[str]) -> None:
        self._names = names
        self._dims = _shape(layout)
        self._layout = layout
        self._coords = {self._at(c): c for c in itertools.product(*(range(d) for d in self._dims))}


def _shape(layout: Any) -> list[int]:
    """The dimensions of a rectangular nested list; ``ValueError`` if ragged."""
    if isinstance(layout, str | bytes) or not isinstance(layout, Sequence):
        return []
    if len(layout) == 0:
        raise ValueError("the layout has an empty dimension")
    inner = [_shape(x) for x in layout]
    if any(s != inner[0] for s in inner):
        raise ValueError(f"the layout is ragged: sub-shapes {inner}")
    return [len(layout), *inner[0]]


def _copy(layout: Any) -> Any:
    if isinstance(layout, str | bytes) or not isinstance(layout, Sequence):
        return layout
    return [_copy(x) for x in layout]


def _select(layout: Any, index: list[Any]) -> Any:
    if not index:
        return layout
    head, rest = index[0], index[1:]
    if isinstance(head, slice):
        return [_select(x, rest) for x in layout]
    return _select(layout[head], rest)
