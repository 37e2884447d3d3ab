"""Image domains of fedmoco (images, medical, satellite): the data contract of fedmoco.data."""

from __future__ import annotations


def lazy_exports(package: str, where: dict[str, str]):
    """``(__getattr__, __dir__)`` for a domain package whose public names load on first use
    (PEP 562). ``where`` maps each name to its submodule (absolute, or relative to ``package``).

    Every federated round is a fresh process: a site must pay only for the submodules it
    touches, not for a package ``__init__`` that imports all of them.
    """
    import importlib
    import sys

    def __getattr__(name: str):
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where[name], package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(where))

    return __getattr__, __dir__
