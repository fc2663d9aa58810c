"""Old name of :mod:`dpsnake.md.explorer`; new code imports that.

Kept only while tests/test_md_engine.py, tests/test_md_graphs.py and bench/bench_md.py (another owner's
files) import ``dpsnake.md.runner``; delete this file once they import ``dpsnake.md.explorer``.
"""

from dpsnake.md.explorer import CHECKPOINT, SUMMARY, Explorer  # noqa: F401
