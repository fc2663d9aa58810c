"""Batched exploration MD: all walkers of an iteration in one flat state on one device (docs/md.md).

Modules: walkers (specs, structures, start), state (the flat batch), integrators (NVE / NVT / NPT
steps), graphs (the integrator stages as CUDA graphs), rng (per-walker counter-based streams), deviation,
trajectory (outputs, ``read_frames``), providers (engine / ASE forces), deepmd_provider (DeePMD-kit's
PyTorch models), engines (which provider explores), explorer (``Explorer``: the exploration loop,
checkpoints, summary), explore (the ``dpsnake explore`` command: arguments, provider, device).
"""
