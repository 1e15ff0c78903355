"""``vlzoo score``: score any model's answer text against a dataset split.

:mod:`~vlzoo.scoring.answers_parser` reads the boxes in an answer, :mod:`~vlzoo.scoring.score`
reads an answers file, maps the boxes to original pixels through a coordinate frame
(:mod:`vlzoo.data.frames`) and scores them with the project's evaluators, under every frame as a
diagnostic; :mod:`~vlzoo.scoring.command` is the command line.  docs/evaluation.md, "Scoring any
model's answers".
"""

from vlzoo.scoring.answers_parser import ParsedAnswer, parse_answer
from vlzoo.scoring.score import AnswersError, ScoreReport, read_answers, reference_samples, score_answers

__all__ = [
    "ParsedAnswer",
    "parse_answer",
    "AnswersError",
    "ScoreReport",
    "read_answers",
    "reference_samples",
    "score_answers",
]
