"""On-disk dataset formats.

Each module registers its loaders with :func:`mimkd.data.registry.register_dataset` when imported;
:mod:`mimkd.data.registry` imports them all on first use.
"""
