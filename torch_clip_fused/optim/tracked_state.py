"""``optimizer.state`` that notices edits, so that cached tensor lists never outlive them.

The optimizers keep each group's momentum buffers in a list between steps (the fused kernels
address them by pointer).  A user may clear the state (``opt.state.clear()``), drop a parameter's
entry or assign a new ``momentum_buffer``: each such edit bumps ``version``, and a group whose
cached list was taken at an older version collects its buffers again.  The optimizers' own
per-step bookkeeping (keys starting with ``clip_`` or ``sstm_``) does not count as an edit.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

_OWN_PREFIXES = ("clip_", "sstm_")


def _is_edit(key) -> bool:
    return not (isinstance(key, str) and key.startswith(_OWN_PREFIXES))


class ParamState(dict):
    """One parameter's state dict; edits of its entries are counted by the owning TrackedState."""

    __slots__ = ("_owner",)

    def __init__(self, owner: "TrackedState", *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._owner = owner

    def __reduce__(self):
        return dict, (dict(self),)  # pickled (deepcopy, torch.save) as the plain dict it stands for

    def __setitem__(self, key, value):
        if _is_edit(key) and self.get(key, None) is not value:
            self._owner.version += 1
        super().__setitem__(key, value)

    def __delitem__(self, key):
        self._owner.version += 1
        super().__delitem__(key)

    def pop(self, *args):
        self._owner.version += 1
        return super().pop(*args)

    def popitem(self):
        self._owner.version += 1
        return super().popitem()

    def clear(self):
        self._owner.version += 1
        super().clear()

    def update(self, *args, **kwargs):
        self._owner.version += 1
        super().update(*args, **kwargs)

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = default
        return self[key]


class TrackedState(defaultdict):
    """torch.optim's ``defaultdict(dict)`` of per-parameter state, with an edit counter."""

    def __init__(self, items=()):
        super().__init__(None)
        self.version = 0
        for key, value in dict(items).items():
            self[key] = value

    def __reduce__(self):
        return defaultdict, (dict,), None, None, iter((k, dict(v) if isinstance(v, Mapping) else v)
                                                      for k, v in self.items())

    def __missing__(self, key):
        value = ParamState(self)
        dict.__setitem__(self, key, value)  # a new, empty entry is not an edit
        return value

    def __setitem__(self, key, value):
        """A dict value becomes a tracked ParamState; any other value (torch.optim allows one, e.g.
        under a key that is not a parameter) is kept as it is."""
        self.version += 1
        if isinstance(value, Mapping) and not (isinstance(value, ParamState) and value._owner is self):
            value = ParamState(self, value)
        super().__setitem__(key, value)

    def __delitem__(self, key):
        self.version += 1
        super().__delitem__(key)

    def pop(self, *args):
        self.version += 1
        return super().pop(*args)

    def popitem(self):
        self.version += 1
        return super().popitem()

    def clear(self):
        self.version += 1
        super().clear()

    def update(self, *args, **kwargs):
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = {} if default is None else default
        return self[key]
