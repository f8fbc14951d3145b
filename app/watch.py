"""Watching a run while it trains, cheaply; and guessing how long a run will take (no Streamlit).

The Train page refreshes once a second while a run goes. A refresh must cost little (the run
shares the CPU with it), so :class:`RunWatch` reads only what is new:

* ``run.json`` through :func:`spider.rundir.read_progress` (one small file: step, total,
  whether an evaluation is under way, training-time rate);
* the lines appended to ``metrics.jsonl`` and ``layers.jsonl`` since the last refresh,
  through the run directory's incremental reader (:class:`spider.rundir.LogTail`: complete
  lines only, from a remembered byte offset; a file rewritten shorter, as ``--resume``
  does, is read again from the start).

Frames are rebuilt only when new lines came, in the columns of :mod:`analysis.stats`, so the
figures of :mod:`analysis.figures` draw them; the page caches the figures the same way.

:func:`estimate` answers "how long will this take?" before a launch from earlier runs of the
same base model in the runs roots: seconds per step (the runner logs each step's own time),
scaled by batch size, plus evaluations (their count times the time one took there).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from analysis import stats
from analysis.run import layers_frame
from spider import rundir
from spider import statistics as vocabulary
from spider.errors import UserError

JsonlTail = rundir.LogTail  # the incremental reader lives with the format


@dataclass
class Snapshot:
    """One refresh of a watched run."""

    progress: rundir.Progress | None
    changed: bool  # new metrics or statistics since the last refresh
    train: pd.DataFrame = field(default_factory=pd.DataFrame)  # TRAIN_COLUMNS + seconds
    metrics: pd.DataFrame = field(default_factory=pd.DataFrame)  # METRICS_COLUMNS
    layers: pd.DataFrame = field(default_factory=pd.DataFrame)  # LAYERS_COLUMNS


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


class RunWatch:
    """Incremental reader of one run directory (see the module docstring)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.name = self.run_dir.name
        run = rundir.RunDir(self.run_dir)
        self.metrics_tail = run.tail_events()
        self.layers_tail = run.tail_layers()
        self.method = ""
        #: what the live heatmap shows: one of :data:`LIVE_HEATMAP_VALUES`
        self.heatmap_value = "mask_density"
        self._frames: tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame] | None = None

    def poll(self) -> Snapshot:
        try:
            progress = rundir.read_progress(self.run_dir)
        except UserError:  # run.json not written yet (the runner is loading the model)
            progress = None
        if not self.method:
            try:
                self.method = str(rundir.RunDir(self.run_dir).read_run().get("method", ""))
            except UserError:
                pass
        changed = self.metrics_tail.read()
        changed = self.layers_tail.read() or changed
        if changed or self._frames is None:
            self._frames = (self._train(), self._metrics(), self._layers())
        train, metrics, layers = self._frames
        return Snapshot(progress, changed, train, metrics, layers)

    def _train(self) -> pd.DataFrame:
        rows = [(self.name, self.method, int(e["step"]), _float(e.get("loss")),
                 _float(e.get("lr")), _float(e.get("seconds")))
                for e in self.metrics_tail.rows if e.get("event") == "train" and "step" in e]
        return pd.DataFrame(rows, columns=[*stats.TRAIN_COLUMNS, "seconds"])

    def _metrics(self) -> pd.DataFrame:
        rows = [(self.name, self.method, int(e["step"]), str(e.get("split")),
                 str(e.get("metric")), _float(e.get("value")))
                for e in self.metrics_tail.rows if e.get("event") == "eval" and "step" in e]
        return pd.DataFrame(rows, columns=list(stats.METRICS_COLUMNS))

    def _layers(self) -> pd.DataFrame:
        """The statistics rows as :attr:`analysis.Run.layers` reads them (every statistic of
        the vocabulary, so the live heatmap can show any of them)."""
        rows = [r for r in self.layers_tail.rows
                if all(r.get(k) is not None for k in ("step", "param", "numel"))]
        try:
            return layers_frame(rows, self.name, self.method)
        except (TypeError, ValueError):  # a damaged row: the analysis pages name it
            return layers_frame([], self.name, self.method)


# ------------------------------------------------------------------------------- the ETA
def eta_text(progress: rundir.Progress) -> str:
    """The progress bar's caption: step / total and what is left, evaluations apart."""
    total = progress.steps or 0
    head = f"step {progress.step} / {total}" if total else f"step {progress.step}"
    if progress.evaluating:
        at = progress.eval_step if progress.eval_step is not None else progress.step
        return f"{head} · evaluating at step {at} (training pauses meanwhile)"
    if progress.eta_s is None:
        return f"{head} · measuring speed…"
    text = f"{head} · about {duration_text(progress.eta_s)} of training left"
    if progress.evals_left and progress.eval_seconds:
        text += (f", plus {progress.evals_left} evaluation"
                 f"{'s' if progress.evals_left != 1 else ''} of ~"
                 f"{duration_text(progress.eval_seconds)}")
    return text


def duration_text(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# ------------------------------------------------------------------------------- estimate
@dataclass
class Estimate:
    seconds: float
    basis: str  # where the numbers come from, for the page


def _same_model(info: dict, model_dir: Path, run_dir: Path) -> bool:
    """Whether run.json ``info`` names ``model_dir`` as its base model, however it names it
    (relative to the run or the project, or absolute: ``spider.rundir.model_candidates``),
    so the bundled sample runs count in a fresh clone too."""
    found = rundir.resolve_model_reference(info.get("model"), run_dir)
    try:
        return found is not None and found.resolve() == model_dir.resolve()
    except OSError:
        return False


@dataclass(frozen=True)
class _Timing:
    """What an earlier run says about how long this model takes."""

    step_seconds: float  # median seconds per optimizer step
    batch_size: int
    eval_seconds: float | None  # mean seconds per evaluation
    scored: dict[str, int]  # examples scored per split in one evaluation
    eval_limit: int  # that run's --eval-limit

    def examples(self, eval_limit: int) -> int:
        """Examples an evaluation scores under ``eval_limit``: per split, the limit or the
        split's size where the split was smaller than this run's limit (it scored them all)."""
        return sum(min(eval_limit, n) if n < self.eval_limit else eval_limit
                   for n in self.scored.values())


def _timing(run_dir: Path) -> _Timing | None:
    """How long a run's steps and evaluations took, and what an evaluation scored."""
    try:
        info = json.loads((run_dir / rundir.RUN_FILE).read_text())
        events = rundir.RunDir(run_dir).read_events()
    except (OSError, ValueError, UserError):
        return None
    config = info.get("config") or {}
    seconds = [float(e["seconds"]) for e in events
               if e.get("event") == "train" and isinstance(e.get("seconds"), (int, float))]
    if len(seconds) < 3:
        return None
    scores = [e for e in events if e.get("event") == "eval" and e.get("metric") == "score"
              and isinstance(e.get("n"), int)]
    scored = {str(e["split"]): int(e["n"]) for e in scores if e["step"] == scores[0]["step"]} \
        if scores else {}
    eval_seconds = None
    progress = info.get("progress") if isinstance(info.get("progress"), dict) else {}
    if isinstance(progress.get("eval_seconds"), (int, float)):
        eval_seconds = float(progress["eval_seconds"])
    elif info.get("status") == "done" and isinstance(info.get("ended"), (int, float)):
        # older runs: what the wall clock spent beyond the training steps, per evaluation
        evals = len({e["step"] for e in events if e.get("event") == "eval"})
        wall = float(info["ended"]) - float(info.get("created", info["ended"]))
        if evals and wall > sum(seconds):
            eval_seconds = (wall - sum(seconds)) / evals
    return _Timing(statistics.median(seconds), int(config.get("batch_size") or 1),
                   eval_seconds if scored else None, scored, int(config.get("eval_limit") or 1))


def estimate(model_dir: str | os.PathLike, steps: int, batch_size: int, eval_every: int,
             eval_limit: int, run_dirs: Iterable[str | os.PathLike], device: str = "cpu"
             ) -> Estimate | None:
    """How long ``steps`` steps will take, from earlier runs of the same base model on the
    same kind of device (None when there is none to go by).

    Steps: an earlier run's median seconds per step, scaled by the batch size. Evaluations:
    its seconds per example scored (all splits of one evaluation together) times the examples
    an evaluation will score under ``eval_limit`` (per split, the limit or the whole split
    where it is smaller). A short timing run scores few examples, and an evaluation's time
    is far from proportional to them (batched generation; a fixed part per split and a
    first-evaluation warm-up: on a CPU, 5 examples per split took 9 s and 100 took 21-54 s),
    which is why :func:`measure` scores as many as the run will (up to
    :data:`MEASURE_EVAL_LIMIT`): the per-example time then carries over."""
    model_dir = Path(model_dir)
    timings = []
    for run_dir in run_dirs:
        run_dir = Path(run_dir)
        try:
            info = json.loads((run_dir / rundir.RUN_FILE).read_text())
        except (OSError, ValueError):
            continue
        if (not isinstance(info, dict) or not _same_model(info, model_dir, run_dir)
                or str(info.get("device", "cpu"))[:4] != device[:4]):
            continue
        found = _timing(run_dir)
        if found:
            timings.append((run_dir.name, found))
    if not timings:
        return None
    per_step = statistics.median(t.step_seconds * batch_size / t.batch_size for _, t in timings)
    evals = [t.eval_seconds / sum(t.scored.values()) * t.examples(eval_limit)
             for _, t in timings if t.eval_seconds and sum(t.scored.values())]
    n_evals = steps // eval_every + 1 + (steps % eval_every != 0)  # step 0, every K, the end
    eval_total = n_evals * statistics.median(evals) if evals else 0.0
    basis = (f"from {len(timings)} earlier run{'s' if len(timings) != 1 else ''} of this model "
             f"({per_step:.2f} s per step at batch {batch_size}"
             + (f", {n_evals} evaluations of ~{duration_text(eval_total / n_evals)}" if evals
                else "") + ")")
    return Estimate(steps * per_step + eval_total, basis)


MEASURE_EVAL_LIMIT = 100
"""Most examples per split the timing run of :func:`measure` scores in an evaluation."""


def measure(model: str, device: str, batch_size: int, folder: str | os.PathLike,
            steps: int = 5, timeout: float = 600.0, eval_limit: int = MEASURE_EVAL_LIMIT
            ) -> Path:
    """Time a few steps of the model (a short run of the runner itself, into ``folder``), so
    that :func:`estimate` has a run to go by: ``steps`` steps and two evaluations of
    ``eval_limit`` examples per split (at most :data:`MEASURE_EVAL_LIMIT`). Returns the timing run's folder; a runner that
    fails raises ``UserError`` with its error line."""
    import subprocess
    import sys
    import tempfile

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="timing-", dir=folder))
    run_dir.rmdir()  # the runner makes it (it refuses a folder that exists and is not empty)
    cmd = [sys.executable, "-m", "spider.train", "--output-dir", str(run_dir), "--model",
           str(model), "--device", device, "--batch-size", str(batch_size), "--steps",
           str(steps), "--eval-every", str(steps), "--eval-limit",
           str(max(1, min(eval_limit, MEASURE_EVAL_LIMIT))),
           "--save-every", str(steps * 10), "--log-every", str(steps), "--train-size",
           str(batch_size * steps)]
    done = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        lines = [x for x in done.stderr.splitlines() if x.startswith(("error:", "failed:"))]
        raise UserError(lines[-1].split(":", 1)[1].strip() if lines else
                        f"the timing run failed (exit {done.returncode})")
    return run_dir


def light_figure(fig):
    """The same figure with its data arrays as plain lists.

    The page sends its figures again on every refresh (``st.plotly_chart`` serialises them
    each time); plotly's serialiser inspects every numpy array it meets (dataframe-library
    checks, base64 encoding), which made serialising the live charts several times slower
    than the same figure holding lists. Converted once when the data change, not per refresh.
    """
    import numpy as np
    import plotly.graph_objects as go

    spec = fig.to_plotly_json()
    for trace in spec.get("data", []):
        for key, value in list(trace.items()):
            if isinstance(value, np.ndarray):
                trace[key] = value.tolist()
    # the spec comes from a valid figure: validating it again cost ~35 ms per figure
    return go.Figure(spec, _validate=False)


LIVE_HEATMAP_VALUES = vocabulary.heatmap_values()
"""``{value: label}`` the live heatmap can show (``spider.statistics.heatmap_values``)."""


def live_value_label(value: str) -> str:
    """The label of a heatmap value, capitalised for a widget."""
    label = vocabulary.label(value)
    return label[:1].upper() + label[1:]


def live_heatmap_title(value: str, run: str = "") -> str:
    return f"{live_value_label(value)}, per layer, as statistics arrive" + (
        f" — {run}" if run else "")


LIVE_HEATMAP_TITLE = live_heatmap_title("mask_density")


def _cached(cache: dict, name: str, key, empty: bool, build):
    """``cache[name]``'s figure, rebuilt (as a light figure) only when ``key`` changed."""
    if name not in cache or cache[name][0] != key:
        cache[name] = (key, None if empty else light_figure(build()))
    return cache[name][1]


def live_curves(runs: Sequence[tuple[RunWatch, Snapshot]], cache: dict,
                colors: Mapping[str, str] | None = None) -> tuple:
    """The live (loss, scores) figures of several watched runs on one chart each, a colour
    per run (``colors``: run name -> colour, as on Compare); None where nothing is logged
    yet. Rebuilt only when some run's lines came in: the loss at every step, the scores at
    evaluations (``cache`` keeps them between refreshes)."""
    from analysis import explore
    from analysis import figures as xfig

    colors = dict(colors or {})
    train = [snap.train for _, snap in runs if not snap.train.empty]
    metrics = [snap.metrics for _, snap in runs if not snap.metrics.empty]
    inodes = tuple(w.metrics_tail.inode for w, _ in runs)
    palette = tuple(sorted(colors.items()))
    loss_key = (inodes, tuple(len(s.train) for _, s in runs), palette)
    score_key = (inodes, tuple(len(s.metrics) for _, s in runs),
                 tuple(len(s.train) > 0 for _, s in runs), palette)

    def frame(parts):
        return pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]

    loss = _cached(cache, "loss", loss_key, not train, lambda: xfig.compare_loss_curves(
        explore.loss_curves_frame(frame(train)), colors or None))
    scores = _cached(cache, "scores", score_key, not metrics, lambda: xfig.compare_score_curves(
        explore.score_curves_frame(frame(metrics), frame(train) if train else runs[0][1].train),
        colors or None))
    return loss, scores


def live_heatmap(watcher: RunWatch, snap: Snapshot, cache: dict, titled: bool = False):
    """The layer heatmap of ``watcher.heatmap_value`` for one watched run (None before its
    first logged statistics), rebuilt only when new statistics came; ``titled`` names the
    run in the title (several runs are watched together)."""
    from analysis import explore
    from analysis import figures as xfig

    value = watcher.heatmap_value

    def heatmap():
        matrix = explore.layer_step_matrix(snap.layers, value)
        return xfig.layer_step_heatmap(matrix, value, explore.fitted_range(matrix[value]),
                                       title=live_heatmap_title(
                                           value, watcher.name if titled else ""))

    key = (watcher.layers_tail.inode, watcher.layers_tail.offset, value, titled)
    return _cached(cache, f"heat:{watcher.name}", key, snap.layers.empty, heatmap)


def live_figures(watcher: RunWatch, snap: Snapshot, cache: dict) -> tuple:
    """The live (loss, scores, layer heatmap of ``watcher.heatmap_value``) figures of one
    watched run, as light figures (None where there is nothing yet). ``cache`` keeps them
    between refreshes, and each is rebuilt only when its own lines came in: the loss at
    every step, the scores at evaluations, the heatmap at logged steps. Rebuilding all
    three on every refresh of a fast run costs ~45 ms; this keeps a refresh near the cost
    of the loss curve alone."""
    return (*live_curves([(watcher, snap)], cache), live_heatmap(watcher, snap, cache))
