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
    "path", "name", "method", "options", "data", "evaluated_on", "status", "steps",
    "checkpoints", "U", "D", "H", "E", "F", "O", "ok", "problem",
)
"""Columns of :func:`run_overview`. ``status`` is ``damaged`` where the run's files cannot be
read (``problem`` says which), else the run's status as :func:`analysis.list_runs` gives it.
``evaluated_on`` is the downstream evaluation data (:func:`eval_text`)."""

_SCORES = ("U", "D", "H", "E", "F", "O")


def options_text(method: str, options: dict) -> str:
    """The options that differ from the method's defaults, ``name=value, ...``; ``default``
    when none do. Unknown methods show every option."""
    try:
        from spider.methods import option_fields

        defaults = {f.name: f.default for f in option_fields(method)}
    except (KeyError, ValueError, UserError):
        defaults = {}
    changed = [f"{k}={v}" for k, v in sorted(options.items())
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


def eval_text(info: dict) -> str:
    """What the run's downstream score was measured on, in a few words: the data's test
    split, the separate ``--eval-data``, or the records held out of a JSON training file.
    Runs from before run.json recorded it: inferred from the config where the rule is
    certain (a built-in dataset is evaluated on its test split), else empty."""
    source = info.get("downstream_eval")
    config = info.get("config") if isinstance(info.get("config"), dict) else {}
    if not isinstance(source, dict):
        if config.get("eval_data"):
            return str(config["eval_data"])
        data = str(config.get("data") or "")
        return "test split" if data.startswith("builtin:") else ""
    kind, examples = source.get("kind"), source.get("examples")
    if kind == "held_out":
        return f"{examples} of {source.get('of')} records, held out of training"
    if kind == "eval_data":
        return f"{source.get('data')} ({examples} examples)"
    return f"test split ({examples} examples)" if examples else "test split"


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
        row["evaluated_on"] = eval_text(run.info)
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
    frame["checkpoints"] = frame["checkpoints"].fillna(0).astype("int64")
    frame["ok"] = frame["ok"].astype(bool)
    for column in _SCORES:
        frame[column] = frame[column].astype(float)
    for column in ("name", "method", "options", "data", "evaluated_on", "status", "problem"):
        frame[column] = frame[column].fillna("").astype(str)
    return frame
