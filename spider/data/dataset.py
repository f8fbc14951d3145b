"""The dataset object every loader returns: indexable, sized, lazy."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator

from spider.data.records import Example


class ExampleDataset:
    """A map-style dataset of :class:`Example` (works with ``torch.utils.data.DataLoader``).

    Examples are made on access by ``make(i)``: built-in ones are generated, JSON ones open
    their images then, so a large dataset costs nothing until it is read.

    Attributes:
        name: what to call it in logs and metrics (the spec it was loaded from).
        tasks: the task names its examples carry, in first-seen order.
        split: the split asked for (``train`` / ``test``); a JSON file is taken whole (the
            split is then only a label) unless part of it is held out for evaluation.
    """

    def __init__(
        self,
        name: str,
        make: Callable[[int], Example],
        length: int,
        tasks: list[str],
        split: str = "train",
    ) -> None:
        self.name = name
        self.tasks = list(tasks)
        self.split = split
        self._make = make
        self._length = length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> Example:
        try:
            index = operator.index(index)  # accepts numpy integers too
        except TypeError:
            raise TypeError(f"{self.name} is indexed by int, not {type(index).__name__}") from None
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError(f"index out of range for {self.name} ({self._length} examples)")
        return self._make(index)

    def __iter__(self) -> Iterator[Example]:
        for i in range(self._length):
            yield self._make(i)

    def __repr__(self) -> str:
        return (
            f"ExampleDataset(name={self.name!r}, split={self.split!r}, "
            f"len={self._length}, tasks={self.tasks})"
        )
