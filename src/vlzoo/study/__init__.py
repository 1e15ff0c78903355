"""Head-to-head paradigm studies: grids of runs, a fair protocol, reports rebuilt from MLflow."""

from __future__ import annotations

from vlzoo.study.report import build_report, collect_results
from vlzoo.study.runner import StudyRun, check_fairness, run_cell, run_study
from vlzoo.study.spec import Cell, StudyError, StudySpec, expand_grid, load_study

__all__ = [
    "Cell",
    "StudyError",
    "StudyRun",
    "StudySpec",
    "build_report",
    "check_fairness",
    "collect_results",
    "expand_grid",
    "load_study",
    "run_cell",
    "run_study",
]
