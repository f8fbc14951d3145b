"""One row per run for a runs table: what was trained, how it ended, and its scores.

:func:`run_overview` extends :func:`analysis.list_runs` (which checks a run's files without
loading tensors) with what a person comparing runs asks first: the method's options that differ
from their defaults, the data (with the share of upstream data mixed in), and the summary
scores U, D, H, E, F, O. Reads run.json and metrics.jsonl only.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd

from analysis.run import list_runs, load_run
from spider.errors import UserError

OVERVIEW_COLUMNS = (
    "path", "name", "method", "options", "data", "evaluated_on", "eval_examples", "status",
    "steps", "checkpoints", "U", "D", "H", "E", "F", "O", "ok", "problem",
)
"""Columns of :func:`run_overview`. ``status`` is ``damaged`` where the run's files cannot be
read (``problem`` says which), else the run's status as :func:`analysis.list_runs` gives it.
``evaluated_on`` is the downstream evaluation data (:func:`eval_text`) with the number of
examples actually scored; ``eval_examples`` that number alone (``<NA>`` where the log does not
say)."""

_SCORES = ("U", "D", "H", "E", "F", "O")


def option_value(value) -> str:
    """An option's value as the command line and every page write it: ``true``/``false``,
    ``none``, a float in its shortest form (``10000``, ``0.5``), else as is."""
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def options_text(method: str, options: dict, only_changed: bool = True) -> str:
    """The options that differ from the method's defaults, ``name=value, ...``; ``default``
    when none do (every option with ``only_changed=False``). Unknown methods show every
    option. Values as :func:`option_value` writes them."""
    if not only_changed:
        return ", ".join(f"{k}={option_value(v)}" for k, v in options.items()) or "default"
    try:
        from spider.methods import option_fields

        defaults = {f.name: f.default for f in option_fields(method)}
    except (KeyError, ValueError, UserError):
        defaults = {}
    changed = [f"{k}={option_value(v)}" for k, v in sorted(options.items())
               if k not in defaults or defaults[k] != v]
    return ", ".join(changed) if changed else "default"


def data_text(config: dict) -> str:
    """The training data, with the share of upstream data mixed in (data-hybrid runs)."""
    data = str(config.get("data") or "")
    ratio = config.get("hybrid_ratio") or 0
    try:
        ratio = float(ratio)
    except (TypeError, ValueError):
        ratio = 0.0
    if ratio > 0:
        data += f" + {ratio:.0%} {config.get('upstream') or 'upstream'}"
    return data


def scored_examples(events: list[dict]) -> int | None:
    """How many examples the run's last downstream score was computed on (the ``n`` of its
    last ``score`` event of the downstream split; ``--eval-limit`` can make it fewer than the
    evaluation data holds), or None when the log does not say."""
    for event in reversed(events):
        if (event.get("split") == "downstream" and event.get("metric") == "score"
                and event.get("n") is not None):
            try:
                return int(event["n"])
            except (TypeError, ValueError):
                return None
    return None


def _examples(count: int) -> str:
    return f"{count} example" + ("" if count == 1 else "s")


def eval_text(info: dict, scored: int | None = None) -> str:
    """What the run's downstream score was measured on, in a few words: the data's test
    split, the separate ``--eval-data``, or the records held out of a JSON training file,
    with ``scored`` (:func:`scored_examples`), the number of examples actually scored, and
    what they were drawn from where that was more.
    Runs from before run.json recorded the source: inferred from the config where the rule
    is certain (a built-in dataset is evaluated on its test split), else empty."""
    source = info.get("downstream_eval")
    config = info.get("config") if isinstance(info.get("config"), dict) else {}
    if not isinstance(source, dict):
        if config.get("eval_data"):
            what = str(config["eval_data"])
        elif str(config.get("data") or "").startswith("builtin:"):
            what = "test split"
        else:
            return f"{_examples(scored)}" if scored else ""
        return f"{what} ({_examples(scored)})" if scored else what
    kind, examples = source.get("kind"), source.get("examples")
    try:
        available = int(examples) if examples is not None else None
    except (TypeError, ValueError):
        available = None
    if scored and available and scored < available:
        count = f"{scored} of {available}"
    elif scored or available:
        count = _examples(scored or available)
    else:
        count = ""
    if kind == "held_out":
        held = f"{examples} of {source.get('of')} records, held out of training"
        if scored and available and scored < available:
            held += f"; {scored} of them scored"
        return held
    if kind == "eval_data":
        return f"{source.get('data')} ({count})" if count else str(source.get("data"))
    return f"test split ({count})" if count else "test split"


def run_overview(path: str | os.PathLike) -> pd.DataFrame:
    """One row (columns :data:`OVERVIEW_COLUMNS`) for the run directory ``path``.

    Never raises for a bad run: a run whose files cannot be read gets status ``damaged`` and
    the reason in ``problem``.
    """
    path = Path(path)
    listed = list_runs(path)
    listed = listed[listed["path"] == str(path)]
    if listed.empty:
        row = {c: None for c in OVERVIEW_COLUMNS}
        row.update(path=str(path), name=path.name, status="damaged", ok=False,
                   problem=f"{path} is not a run directory", checkpoints=0)
        return _frame([row])
    row = {c: listed.iloc[0].get(c) for c in OVERVIEW_COLUMNS if c in listed.columns}
    row.update(options="", E=math.nan, F=math.nan, O=math.nan)
    row["path"] = str(path)
    if not row["ok"] or not row.get("status"):
        row["status"] = "damaged"
    try:
        run = load_run(path)
        row["options"] = options_text(run.method, run.options)
        row["data"] = data_text(run.config)
        scored = scored_examples(run._events())
        row["eval_examples"] = scored
        row["evaluated_on"] = eval_text(run.info, scored)
        if row["ok"]:
            summary = run.summary
            if not summary.empty:
                for k in _SCORES:
                    value = float(summary[k].iloc[0])
                    if not math.isnan(value) or k in ("E", "F", "O"):
                        row[k] = value
    except (UserError, KeyError, ValueError, TypeError):
        pass  # list_runs already said what is wrong
    return _frame([row])


def _frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame.from_records(rows, columns=list(OVERVIEW_COLUMNS))
    frame["steps"] = pd.array(frame["steps"], dtype="Int64")
    frame["eval_examples"] = pd.array(frame["eval_examples"], dtype="Int64")
    frame["checkpoints"] = frame["checkpoints"].fillna(0).astype("int64")
    frame["ok"] = frame["ok"].astype(bool)
    for column in _SCORES:
        frame[column] = frame[column].astype(float)
    for column in ("name", "method", "options", "data", "evaluated_on", "status", "problem"):
        frame[column] = frame[column].fillna("").astype(str)
    return frame
