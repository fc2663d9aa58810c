"""dpsnake: concurrent learning of Deep Potential models with Snakemake.

The DeePMD-kit-compatible inference front is importable from the top level, so scripts written for
``deepmd.infer`` switch by changing one import::

    from dpsnake import DeepPot, calc_model_devi, DP
"""

__version__ = "0.1.0"

_LAZY = {
    "DeepPot": "dpsnake.engine.deeppot",
    "calc_model_devi": "dpsnake.engine.model_devi",
    "DP": "dpsnake.engine.calculator",
}


def __getattr__(name):
    # Lazy so that `import dpsnake` (the CLI, Snakemake rules) never pays for h5py/engine imports.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dpsnake' has no attribute {name!r}")


__all__ = ["DeepPot", "calc_model_devi", "DP", "__version__"]
