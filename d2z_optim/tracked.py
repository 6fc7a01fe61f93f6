"""Containers that count their own changes: ``opt.state``, each parameter's state dict, and each
group's ``params`` list.

The step cache reuses a step's tensor lists while nothing they came from changed. Checking that
by identity costs ~0.1 us per parameter and key each step (about 1 ms for 10,000 parameters,
more than a GPU step's whole host budget); these containers make it one integer comparison. They
are plain ``dict`` / ``defaultdict`` / ``list`` subclasses (torch's code and the user's see the
types they expect), pickle and ``state_dict()`` as plain ones, and every mutating method bumps a
counter shared by one optimizer. A plain dict or list put in their place (``opt.state[p] = {...}``)
is seen too: the cache then checks by identity, as before.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

__all__ = ["Counter", "OptimizerState", "ParamList", "ParamState"]


class Counter:
    """How many changes the containers of one optimizer have seen."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


class ParamState(dict):
    """One parameter's state (``opt.state[p]``): a dict counting its changes."""

    __slots__ = ("_changes",)

    def __init__(self, changes: Counter, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._changes = changes

    def __reduce__(self):  # pickles (and deep-copies) as a plain dict
        return dict, (dict(self),)

    def __setitem__(self, key, value):
        self._changes.n += 1
        super().__setitem__(key, value)

    def __delitem__(self, key):
        self._changes.n += 1
        super().__delitem__(key)

    def update(self, *args, **kwargs):
        self._changes.n += 1
        super().update(*args, **kwargs)

    def pop(self, *args):
        self._changes.n += 1
        return super().pop(*args)

    def popitem(self):
        self._changes.n += 1
        return super().popitem()

    def clear(self):
        self._changes.n += 1
        super().clear()

    def setdefault(self, key, default=None):
        self._changes.n += 1
        return super().setdefault(key, default)

    def __ior__(self, other):
        self._changes.n += 1
        return super().__ior__(other)


class ParamList(list):
    """A group's ``params``: a list counting its changes."""

    __slots__ = ("_changes",)

    def __init__(self, changes: Counter, items=()) -> None:
        super().__init__(items)
        self._changes = changes

    def __reduce__(self):
        return list, (list(self),)

    def __setitem__(self, index, value):
        self._changes.n += 1
        super().__setitem__(index, value)

    def __delitem__(self, index):
        self._changes.n += 1
        super().__delitem__(index)

    def __iadd__(self, other):
        self._changes.n += 1
        return super().__iadd__(other)

    def __imul__(self, n):
        self._changes.n += 1
        return super().__imul__(n)

    def append(self, value):
        self._changes.n += 1
        super().append(value)

    def extend(self, values):
        self._changes.n += 1
        super().extend(values)

    def insert(self, index, value):
        self._changes.n += 1
        super().insert(index, value)

    def pop(self, *args):
        self._changes.n += 1
        return super().pop(*args)

    def remove(self, value):
        self._changes.n += 1
        super().remove(value)

    def clear(self):
        self._changes.n += 1
        super().clear()

    def sort(self, *args, **kwargs):
        self._changes.n += 1
        super().sort(*args, **kwargs)

    def reverse(self):
        self._changes.n += 1
        super().reverse()


class OptimizerState(defaultdict):
    """``opt.state``: torch's ``defaultdict(dict)``, whose new values are :class:`ParamState`."""

    def __init__(self, changes: Counter, items: Any = ()) -> None:
        super().__init__()
        self._changes = changes
        self.default_factory = self._new
        for k, v in dict(items).items():
            super().__setitem__(k, ParamState(changes, v) if isinstance(v, dict) else v)

    def _new(self) -> ParamState:
        return ParamState(self._changes)

    def __reduce__(self):
        return defaultdict, (dict,), None, None, iter(self.items())

    def __setitem__(self, key, value):
        self._changes.n += 1
        super().__setitem__(key, value)

    def __delitem__(self, key):
        self._changes.n += 1
        super().__delitem__(key)

    def update(self, *args, **kwargs):
        self._changes.n += 1
        super().update(*args, **kwargs)

    def pop(self, *args):
        self._changes.n += 1
        return super().pop(*args)

    def popitem(self):
        self._changes.n += 1
        return super().popitem()

    def clear(self):
        self._changes.n += 1
        super().clear()

    def setdefault(self, key, default=None):
        self._changes.n += 1
        return super().setdefault(key, default)

    def __ior__(self, other):
        self._changes.n += 1
        return super().__ior__(other)

    def counts_all(self) -> bool:
        """Every value is one of ours: a change to any of them is counted."""
        c = self._changes
        return all(type(v) is ParamState and v._changes is c for v in self.values())

    @property
    def changes(self) -> int:
        return self._changes.n
