"""peer/ composes hivemind from its public parts: no class overrides an underscore method of a hivemind class.

(The old peer core subclassed hivemind.Optimizer and ConnectionHandler and replaced five private methods.)
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import peer


def _hivemind_bases(cls: type) -> list[type]:
    return [b for b in cls.__mro__[1:] if b.__module__.startswith("hivemind")]


def test_no_peer_class_overrides_a_private_hivemind_method() -> None:
    offenders, checked = [], []
    for info in pkgutil.iter_modules(peer.__path__):
        module = importlib.import_module(f"peer.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != module.__name__ or not _hivemind_bases(cls):
                continue
            checked.append(cls.__name__)
            for name, value in vars(cls).items():
                # methods only: hivemind itself caches data on subclasses (ServicerBase._rpc_handlers, _stub_type)
                private = name.startswith("_") and not name.startswith("__") and inspect.isfunction(value)
                if private and any(name in vars(base) for base in _hivemind_bases(cls)):
                    offenders.append(f"{cls.__name__}.{name}")
    assert checked, "expected peer classes built on hivemind (the averager, the span servicer)"
    assert not offenders, f"overrides of hivemind's private methods: {offenders}"
