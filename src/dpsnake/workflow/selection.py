"""Old name of :mod:`dpsnake.workflow.candidates` (pure selection math); new code imports that.

Kept only while bench/science/bench_selection.py (the lead's file) imports ``dpsnake.workflow.selection``;
delete this file once it imports ``dpsnake.workflow.candidates``.
"""

from dpsnake.workflow.candidates import (  # noqa: F401
    ACCURATE,
    CANDIDATE,
    FAILED,
    MODEL_DEVI_COLUMNS,
    adaptive_lo,
    classify,
    decide,
    decide_from_stats,
    pick,
    read_model_devi,
    structure_problem,
)
