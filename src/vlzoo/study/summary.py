"""The first paragraph of a study report, written from its numbers.

Three questions, answered per referring task from the test figures (mean over seeds, at the
largest budget of each cell):

* **which paradigms localize** - reach ``localize_at`` (0.9) on the ``one`` rung, where the
  image holds only the referred object (the positive control);
* **which select** - beat the random-object baseline on the ``full`` rung (a study without a
  rung axis is the full rung);
* **which keep the stage-0 abilities** - every stage-0 figure of the trained backbone is at
  least ``keep_ratio`` (0.9) of its value before the cell's training.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["first_paragraph", "LOCALIZE_AT", "KEEP_RATIO"]

LOCALIZE_AT = 0.9
KEEP_RATIO = 0.9


def _names(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _verb(items: list[str], singular: str, plural: str) -> str:
    return singular if len(items) == 1 else plural


def first_paragraph(
    *,
    scores: Mapping[tuple[str, str, str], float],
    selection: Mapping[tuple[str, str], float],
    retention: Mapping[str, Mapping[str, tuple[float, float]]],
    primary: Mapping[str, str],
    localize_at: float = LOCALIZE_AT,
    keep_ratio: float = KEEP_RATIO,
) -> str:
    """The paragraph, from

    * ``scores``: ``(task, paradigm, rung) -> test figure`` (rung ``""`` without a rung axis);
    * ``selection``: ``(task, rung) -> selection baseline`` on the same data: a figure (the
      random object's) or ``(figure, its name)`` (e.g. ``"union of every object"`` on RES);
    * ``retention``: ``paradigm -> {stage-0 figure: (before, after)}`` (the worst cell counts);
    * ``primary``: ``task -> figure name``.

    Returns ``""`` when the numbers answer none of the questions."""
    sentences: list[str] = []
    for task in dict.fromkeys(t for t, _, _ in scores):
        metric = primary.get(task, "the primary figure")
        one = [(p, v) for (t, p, r), v in scores.items() if t == task and r == "one"]
        if one:
            yes = [f"{p} ({v:.2f})" for p, v in one if v >= localize_at]
            no = [f"{p} ({v:.2f})" for p, v in one if v < localize_at]
            head = f"On `{task}` ({metric}), "
            if yes:
                text = f"{head}{_names(yes)} {_verb(yes, 'localizes', 'localize')} a lone object (>= {localize_at:g} on the `one` rung)"
                if no:
                    text += f"; {_names(no)} {_verb(no, 'does', 'do')} not, a failed positive control"
            else:
                text = f"{head}no paradigm localizes a lone object (>= {localize_at:g} on the `one` rung): {_names(no)}"
            sentences.append(text + ".")
        full = [(p, v, r) for (t, p, r), v in scores.items() if t == task and r in ("full", "")]
        named = {r: selection.get((task, r)) for _, _, r in full}
        bases = {r: (b[0] if isinstance(b, tuple) else b) for r, b in named.items()}
        if full and all(b is not None for b in bases.values()):
            first = next(iter(named.values()))
            base, label = first if isinstance(first, tuple) else (first, "random object")
            yes = [f"{p} ({v:.2f})" for p, v, r in full if v > bases[r]]
            no = [f"{p} ({v:.2f})" for p, v, r in full if v <= bases[r]]
            where = "on the `full` rung" if any(r == "full" for _, _, r in full) else "on this data"
            head = f"On `{task}` {where}, " if not one else "Selecting the referred object "
            head += f"(above the {label}'s {base:.2f}{' ' + where if one else ''}): "
            parts = []
            if yes:
                parts.append(f"{_names(yes)} {_verb(yes, 'selects', 'select')}")
            if no:
                parts.append(f"{_names(no)} {_verb(no, 'does', 'do')} not")
            sentences.append(head + "; ".join(parts) + ".")
    if retention:
        kept, lost = [], []
        for paradigm, figures in retention.items():
            ratios = [after / before for before, after in figures.values() if before > 0]
            if not ratios:
                continue
            worst = min(ratios)
            (kept if worst >= keep_ratio else lost).append(f"{paradigm} ({worst:.0%})")
        if kept or lost:
            parts = []
            if kept:
                parts.append(f"{_names(kept)} {_verb(kept, 'keeps', 'keep')} them")
            if lost:
                parts.append(f"{_names(lost)} {_verb(lost, 'loses', 'lose')} them")
            sentences.append(
                f"Stage-0 abilities (every stage-0 figure at least {keep_ratio:.0%} of its value before; worst "
                f"cell's share in brackets): " + "; ".join(parts) + "."
            )
    return " ".join(sentences)
