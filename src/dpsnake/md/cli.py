"""Old name of :mod:`dpsnake.md.explore` (the ``dpsnake explore`` command); new code imports that.

Kept only while bench/bench_md.py (another owner's file) imports ``dpsnake.md.cli``; delete this file
once it imports ``dpsnake.md.explore``.
"""

from dpsnake.md.explore import make_provider, pick_xp  # noqa: F401
