"""A bounded least-recently-used map: the per-process caches of searches (query embeddings,
neighbour lists, filter matches) are built on it."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable


class LRU:
    """A bounded, thread-safe map that drops the least recently used entry first.

    ``size`` is a number or a function read at each insertion (so a setting
    changed at run time applies); 0 keeps nothing.
    """

    def __init__(self, size: int | Callable[[], int]):
        self._size = size
        self._items: OrderedDict[Hashable, object] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return max(0, int(self._size() if callable(self._size) else self._size))

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def get(self, key):
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key, value) -> None:
        size = self.size
        if not size:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > size:
                self._items.popitem(last=False)
