"""Head-to-head paradigm studies: grids of runs, a fair protocol, reports rebuilt from MLflow."""

from __future__ import annotations

from vlzoo.study.baselines import baseline_figures, recipe_baselines
from vlzoo.study.compare import Interval, verdict, welch_interval
from vlzoo.study.report import build_report, collect_results, comparison_tables
from vlzoo.study.runner import StudyRun, check_fairness, run_cell, run_study
from vlzoo.study.spec import Cell, Comparison, StudyError, StudyPart, StudySpec, expand_grid, load_study
from vlzoo.study.summary import first_paragraph
from vlzoo.study.zeroshot import check_zero_shot

__all__ = [
    "Cell",
    "Comparison",
    "Interval",
    "StudyPart",
    "StudyError",
    "StudyRun",
    "StudySpec",
    "baseline_figures",
    "build_report",
    "check_fairness",
    "check_zero_shot",
    "collect_results",
    "comparison_tables",
    "expand_grid",
    "first_paragraph",
    "load_study",
    "recipe_baselines",
    "run_cell",
    "run_study",
    "verdict",
    "welch_interval",
]
