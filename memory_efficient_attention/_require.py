"""A framework that is missing says which extra installs it.

Each framework subpackage calls ``require`` before it imports its framework, so a user without
torch reads ``pip install "memory-efficient-attention[torch]"`` instead of a bare
``ModuleNotFoundError: No module named 'torch'``::

    >>> require("json", "none", "this doctest")  # installed: nothing happens
    >>> require("not_installed_module", "torch", "memory_efficient_attention.torch")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ModuleNotFoundError: ... needs not_installed_module, ...: pip install "memory-efficient-attention[torch]"
"""

from __future__ import annotations

import importlib

__all__ = ["require"]


def require(module: str, extra: str, feature: str) -> None:
    """Import ``module`` or raise ``ModuleNotFoundError`` naming the extra that installs it.

    Only a missing ``module`` itself is translated; an error inside it (a broken install, a
    missing dependency of the framework) propagates unchanged."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is not None and err.name != module and not module.startswith(err.name + "."):
            raise
        raise ModuleNotFoundError(
            f"{feature} needs {module}, which is not installed: "
            f'pip install "memory-efficient-attention[{extra}]"',
            name=module,
        ) from err
