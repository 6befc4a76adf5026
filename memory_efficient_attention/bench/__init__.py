"""The benchmark command: ``python -m memory_efficient_attention bench`` (see ``cli``).

Modules: ``cli`` (arguments, the command), ``cases`` (implementations, shapes, skips),
``run`` (the parent: worker subprocesses), ``worker`` (the subprocess), ``measure`` (memory and
time inside it), ``torch_impls``/``jax_impls`` (the implementations, imported by workers only),
``report`` (table, JSON, plot), ``paper`` (``--paper``), ``memory_demo`` (``memory``).

Importing this package imports neither torch nor jax.
"""
