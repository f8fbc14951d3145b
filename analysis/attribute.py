"""Which part of the update made a run forget: revert it and score again.

    python -m analysis.attribute RUN [--step S] [--by component|layer|module] [--eval-limit N]

For each group of trained tensors (by ``spider.naming`` component, by layer, or by module
kind across layers), the checkpoint of ``--step`` with that group's update reverted to
theta0 (the base model's weights) is scored on the run's own upstream and downstream
evaluation sets (the run's evaluator settings and ``--eval-limit``, the same examples).
Two reference rows: ``(none)`` (nothing reverted: the run's evaluation at that step, when
the checkpoint holds every trained tensor in float32) and ``(all)`` (everything reverted:
the step-0 evaluation). Rows go to ``RUN/attribution.jsonl`` (``spider.rundir``) one by one;
a group already written for that step and grouping is skipped, so an interrupted command
continues where it stopped. ``analysis.load_run(RUN).attribution`` reads them back.

The checkpoint is loaded once; each group's tensors are swapped to theta0 in place, scored
and swapped back, so the cost is about one evaluation per group.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from spider.errors import CliParser, UserError, cli_main, positive_int

BY = ("component", "layer", "module")
NONE, ALL = "(none)", "(all)"
SPLITS = ("upstream", "downstream")


ATTRIBUTION_COLUMNS = ("run", "method", "step", "by", "group", "params", "limit",
                       "U", "D", "H", "dU", "dD", "dH")
"""Columns of ``Run.attribution``: one row per (step, grouping, group); ``dU`` ``dD`` ``dH``
are the differences to the ``(none)`` row of the same step, grouping and limit (reverting a
group that caused forgetting gives ``dU > 0``; ``dD < 0`` is the downstream it costs)."""


def attribution_frame(rows: list, run: str = "", method: str = "") -> pd.DataFrame:
    """``attribution.jsonl``'s rows (:class:`spider.rundir.AttributionRow`) as a frame with
    :data:`ATTRIBUTION_COLUMNS`; differences are NaN where the ``(none)`` row is missing."""
    from spider.metrics import harmonic_mean

    records = []
    for r in rows:
        u, d = r.scores.get("upstream", math.nan), r.scores.get("downstream", math.nan)
        records.append({"run": run, "method": method, "step": r.step, "by": r.by,
                        "group": r.group, "params": r.params, "limit": r.limit, "U": u, "D": d,
                        "H": float(harmonic_mean(u, d)) if u == u and d == d else math.nan})
    frame = pd.DataFrame(records, columns=list(ATTRIBUTION_COLUMNS[:10]))
    frame = frame.drop_duplicates(["step", "by", "group", "limit"], keep="last")
    keys = ["step", "by", "limit"]
    base = frame[frame["group"] == NONE][[*keys, "U", "D", "H"]]
    merged = frame.merge(base, on=keys, how="left", suffixes=("", "_none"))
    for col in ("U", "D", "H"):
        merged[f"d{col}"] = merged[col] - merged[f"{col}_none"]
    out = merged[list(ATTRIBUTION_COLUMNS)].reset_index(drop=True)
    out["step"] = out["step"].astype("int64")
    return out


def best_reverts(frame: pd.DataFrame, top: int = 2) -> str:
    """One sentence naming the groups whose revert buys back the most upstream score for the
    least downstream score (largest ``dU + dD``, among those with ``dU > 0``). ``frame``: the
    rows of one run, step and grouping."""
    rows = frame[~frame["group"].isin((NONE, ALL))].dropna(subset=["dU", "dD"])
    gains = rows[rows["dU"] > 0].assign(net=lambda f: f["dU"] + f["dD"])
    if gains.empty:
        return ("Reverting no single group buys back upstream score: the forgetting is not "
                "in one group (or there was none to buy back).")
    best = gains.sort_values(["net", "dU"], ascending=False).head(top)
    parts = [f"{r.group} (U {r.dU:+.3f} for D {r.dD:+.3f})" for r in best.itertuples()]
    return ("Reverting " + " or ".join(parts) + " buys back the most upstream score for the "
            "least downstream score.")


def group_of(param: str, by: str) -> str:
    """The group ``param`` belongs to: its component (``spider.naming``), its layer
    (``llm.3``; tensors outside layers by component), or its kind of module across layers
    (``q_proj`` ... ``down_proj`` and the LLM's other modules; ``projector``, ``vision``)."""
    from spider.naming import parse_param_name

    name = parse_param_name(param)
    if by == "component":
        return name.component
    if by == "layer":
        return name.component if name.layer is None else f"{name.component}.{name.layer}"
    if by == "module":
        return name.module if name.component == "llm" else name.component
    raise UserError(f"--by must be one of {', '.join(BY)}, not {by!r}")


def groups_of(params: list[str], by: str) -> dict[str, list[str]]:
    """``{group: params}``, groups in model order (``spider.naming`` components, layers)."""
    from spider.naming import component_rank, parse_param_name

    groups: dict[str, list[str]] = {}
    for param in params:
        groups.setdefault(group_of(param, by), []).append(param)

    def order(item):
        name = parse_param_name(item[1][0])
        return (component_rank(name.component), -1 if name.layer is None else name.layer,
                params.index(item[1][0]))

    return dict(sorted(groups.items(), key=order))


def _run_config(run_dir):
    """The run's ``RunConfig`` from its run.json (settings it no longer knows are dropped)."""
    from spider.train import RunConfig

    stored = run_dir.read_run().get("config", {})
    known = {f.name for f in dataclasses.fields(RunConfig)}
    try:
        return RunConfig(**{k: v for k, v in stored.items() if k in known})
    except TypeError as err:
        raise UserError(f"{run_dir.run_file}: its config cannot be read ({err})") from None


def attribute(run_path: str | Path, step: int | None = None, by: str = "component",
              eval_limit: int | None = None, progress: bool = True,
              device: str = "cpu") -> list:
    """Score the checkpoint of ``step`` (default: the last) with each group's update
    reverted; append the rows not yet in ``attribution.jsonl`` and return every row of
    this step and grouping (:class:`spider.rundir.AttributionRow`)."""
    from tqdm.auto import tqdm

    from analysis.run import load_run
    from spider.evaluate import evaluate
    from spider.models import load_model
    from spider.rundir import AttributionRow, RunDir
    from spider.train import load_data

    if by not in BY:
        raise UserError(f"--by must be one of {', '.join(BY)}, not {by!r}")
    run = load_run(run_path)
    run_dir = RunDir(run_path)
    steps = run.steps
    if not steps:
        raise UserError(f"run {run_path} has no checkpoint to attribute")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise UserError(f"run {run_path} has no checkpoint of step {step} "
                        f"(it has {', '.join(map(str, steps))})")
    cfg = _run_config(run_dir)
    limit = eval_limit or cfg.eval_limit
    done = {r.group: r for r in run_dir.read_attribution() if r.step == step and r.by == by
            and r.limit == limit}
    params = run.params(step)
    groups = {NONE: [], **groups_of(params, by), ALL: params}
    todo = [g for g in groups if g not in done]
    if not todo:
        return [done[g] for g in groups]

    meta = run_dir.checkpoint_meta(step)
    if progress and (meta.save_dtype != "float32" or meta.save_tensors):
        print(f"note: the checkpoint of step {step} keeps "
              + (f"{meta.save_dtype} weights" if meta.save_dtype != "float32" else "")
              + (" and " if meta.save_dtype != "float32" and meta.save_tensors else "")
              + (f"only the tensors matching {meta.save_tensors!r}" if meta.save_tensors
                 else "")
              + f", so {NONE} approximates the run's own evaluation at that step; the rows "
              f"are compared with {NONE}", file=sys.stderr)
    data = load_data(cfg, report=False)
    sets = {s: data.eval_sets[s] for s in SPLITS}
    examples = {s: [d[i] for i in range(min(limit, len(d)))] for s, d in sets.items()}
    model, processor = load_model(run_dir.checkpoint_dir(step), device=device)
    model.eval()
    state = model.state_dict()
    tuned = {p: state[p].detach().clone() for p in params}
    theta0 = {p: run.theta0(p) for p in params}

    def score() -> dict[str, float]:
        return {s: evaluate(model, processor, ex, batch_size=64, limit=limit)["score"]
                for s, ex in examples.items()}

    bar = tqdm(todo, desc=f"reverting by {by} at step {step}", file=sys.stderr,
               disable=not progress, unit="group")
    timings: list[float] = []
    with torch.no_grad():
        for group in bar:
            bar.set_postfix_str(group)
            t0 = time.perf_counter()
            for p in groups[group]:
                state[p].copy_(theta0[p])
            try:
                scores = score()
            finally:
                for p in groups[group]:
                    state[p].copy_(tuned[p])
            timings.append(time.perf_counter() - t0)
            row = AttributionRow(step, by, group, scores, len(groups[group]), limit)
            run_dir.append_attribution([row])
            done[group] = row
    attribute.timings = timings  # seconds per group, for the cost measurement
    return [done[g] for g in groups]


def _parser() -> argparse.ArgumentParser:
    parser = CliParser(
        prog="python -m analysis.attribute",
        description="Revert each group of a run's update to the base weights and score the "
        "run's upstream and downstream sets again: which part of the update made it forget. "
        "Rows go to RUN/attribution.jsonl.",
    )
    parser.add_argument("run", help="run directory")
    parser.add_argument("--step", type=int, default=None,
                        help="checkpoint step (default: the last)")
    parser.add_argument("--by", choices=BY, default="component",
                        help="grouping: component, layer or module (default: component)")
    parser.add_argument("--eval-limit", type=positive_int, default=None,
                        help="examples per split (default: the run's --eval-limit)")
    parser.add_argument("--device", default="cpu",
                        help="cpu, cuda or auto (default: cpu)")
    return parser


@cli_main
def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m analysis.attribute``."""
    args = _parser().parse_args(argv)
    if not Path(args.run).is_dir():
        raise UserError(f"run directory {args.run} does not exist")
    rows = attribute(args.run, args.step, args.by, args.eval_limit, device=args.device)
    none = next(r for r in rows if r.group == NONE)
    for row in rows:
        line = "  ".join(f"{s} {v:.3f} ({v - none.scores[s]:+.3f})" for s, v in row.scores.items())
        print(f"{row.group:>14}  {line}")


if __name__ == "__main__":
    main()
