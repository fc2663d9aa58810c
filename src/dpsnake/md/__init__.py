"""Batched exploration MD: all walkers of an iteration in one flat state on one device (docs/md.md).

Modules: walkers (specs, structures, start), state (the flat batch), integrators (NVE / NVT / NPT
steps), rng (per-walker counter-based streams), deviation, trajectory (outputs, ``read_frames``),
providers (engine / ASE forces), runner (the exploration loop, checkpoints), cli (``dpsnake explore``).
"""
