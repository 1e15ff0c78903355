"""``vlzoo score``: score any model's answer text against a dataset split.

:mod:`~vlzoo.scoring.answers_parser` reads the boxes in an answer (and
:mod:`~vlzoo.scoring.objects_parser` the labelled boxes of a detection answer and the polygons of
a RES one), :mod:`~vlzoo.scoring.score` reads an answers file, maps the boxes to original pixels
through a coordinate frame (:mod:`vlzoo.data.frames`) and scores them with the project's
evaluators, under every frame as a diagnostic (:mod:`~vlzoo.scoring.tasks`: RES masks and
detection AP); :mod:`~vlzoo.scoring.command` is the command line.  docs/evaluation.md, "Scoring
any model's answers".
"""

from vlzoo.scoring.answers_parser import ParsedAnswer, parse_answer
from vlzoo.scoring.objects_parser import ParsedObjects, ParsedPolygons, parse_objects, parse_polygons
from vlzoo.scoring.score import AnswersError, ScoreReport, read_answers, reference_samples, score_answers

__all__ = [
    "ParsedAnswer",
    "parse_answer",
    "ParsedObjects",
    "ParsedPolygons",
    "parse_objects",
    "parse_polygons",
    "AnswersError",
    "ScoreReport",
    "read_answers",
    "reference_samples",
    "score_answers",
]
