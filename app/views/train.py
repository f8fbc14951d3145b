"""Train: launch fine-tunes from the browser, watch them live, cancel, resume.

Thin page over :mod:`app.jobs` (queue, processes, liveness, checks before launch) and
:mod:`app.watch` (cheap incremental reads, the ETA, the estimate). Nothing about a job lives in
the browser session: the queue and the runs are on disk under the user's runs folder, so a
reload, a second tab or a restarted app shows the same jobs. The live part is one top-level
``st.fragment`` that refreshes every second while something is queued or running, and not at
all otherwise.

The runs of one Launch are watched together (``jobs.launch_groups``): each run's status,
progress and Cancel / Resume, and one chart of their scores and one of their losses, a colour
per run as on Compare — launch SPIDER and full together and full's forgetting is on the same
chart as SPIDER's, not hidden behind a run picker. A preset (:data:`PRESETS`, also
``/train?preset=NAME``) fills the form in; Launch starts it.
"""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path

import streamlit as st

from analysis import overview
from app import common, jobs, presentation, watch
from spider.data import builtin_names
from spider.errors import UserError
from spider.methods import available_methods, method_class, option_fields
from spider.models import resolve_model_path

REFRESH_S = 1.0
_WATCH_KEY = "train_watch_run"  # the run shown in the live panel (a run folder name)
_HEAT_KEY = "train_heat_value"  # what the live heatmap shows (a statistic's name)
_WATCHERS_KEY = "train_watchers"  # run folder -> app.watch.RunWatch (this session's offsets)
_FIGS_KEY = "train_figures"  # watched run names -> figures, redrawn only on new lines
_HEAT_RUN_KEY = "train_heat_run"  # whose layer heatmap is shown (a run of the watched group)
_COLORS_KEY = "train_colors"  # (root, group) -> run colours, taken once per group
# The runner's flags as the page names them, for messages from the runner's own checks.
_LABELS = {"--steps": "Steps", "--lr": "Learning rate", "--batch-size": "Batch size",
           "--eval-every": "Evaluate every (steps)", "--save-every": "Checkpoint every (steps)",
           "--hybrid-ratio": "Hybrid ratio", "--seed": "Seed", "--eval-limit":
           "Test examples per evaluation", "--train-size": "Training examples",
           "--log-every": "Statistics every (steps)"}
_STATE_LABELS = {  # Streamlit's own icon font: emoji may be missing on the machine
    "queued": ":material/schedule: queued", "starting": ":material/hourglass_top: starting",
    "running": ":material/directions_run: running", "done": ":material/check_circle: done",
    "failed": ":material/error: failed", "cancelled": ":material/stop_circle: cancelled",
    jobs.STOPPED_UNEXPECTEDLY: ":material/warning: stopped unexpectedly"}
_BUNDLED_MODEL = "The bundled tiny LLaVA"
_LOCAL_MODEL = "A model folder on this machine"
_BUILTIN_DATA = "A built-in task"
_JSON_DATA = "A LLaVA-format JSON file"


@st.cache_resource(show_spinner=False)
def _defaults() -> dict:
    return jobs.runner_defaults()


@st.cache_resource(show_spinner=False)
def _device_text() -> str:
    import torch

    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        return f"CUDA is available: {names}. `auto` trains there."
    return "CUDA is not available here: runs train on the CPU."


@st.cache_data(show_spinner=False, max_entries=64)
def _check_cached(what: str, text: str, mtime: float) -> str:
    """``""`` if the model / data ``text`` is fine, else why not (cached per file version)."""
    del mtime  # part of the cache key: an edited file is checked again
    try:
        if what == "model":
            jobs.check_model(text)
        else:
            jobs.check_data(text)
    except UserError as err:
        return str(err)
    return ""


def _mtime(path: str) -> float:
    try:
        return Path(path).stat().st_mtime
    except OSError:
        return 0.0


def _message(text: str) -> str:
    for flag, label in _LABELS.items():
        text = text.replace(flag + " ", f"“{label}” ")
    return text[:1].upper() + text[1:]


def _plain(text: str) -> str:
    """``text`` shown as written in Markdown: ``*``, ``_``, ``$`` (LaTeX), ``|`` and the like
    escaped, so that "lam * sum" or "p_drop" are not read as emphasis or formulae."""
    return "".join("\\" + c if c in "\\`*_{}[]<>()#+-.!|$~" else c for c in text)


def _allowed_roots() -> list[Path]:
    """Where a typed model or data path may be: exactly the repository, the runs folders and
    those ``SPIDERSCOPE_ROOTS`` names, each once (:func:`app.common.allowed_roots`)."""
    return common.allowed_roots()


# ----------------------------------------------------------------------------- the form
def _model_input(problems: list[str]) -> str:
    choice = st.radio("Base model", [_BUNDLED_MODEL, _LOCAL_MODEL], horizontal=True,
                      key="train_model_choice",
                      help="The model the run fine-tunes. A local folder must hold a saved "
                           "Hugging Face image-text model (LLaVA-style), or be a run "
                           "checkpoint RUN/checkpoints/step-N.")
    if choice == _BUNDLED_MODEL:
        return str(_defaults()["model"])
    typed = st.text_input("Model folder", key="train_model_path",
                          placeholder="/path/to/a/llava-model")
    path, reason = common.safe_path(typed, _allowed_roots())
    if path is None:
        problems.append(reason if typed.strip() else "Model folder: type the folder's path.")
        return typed
    reason = _check_cached("model", str(path), _mtime(str(path / "config.json")))
    if reason:
        problems.append(_message(reason))
    else:
        st.caption(f"✓ `{path}` loads as an image-text model.")
    return str(path)


def _data_input(problems: list[str]) -> str:
    choice = st.radio("Data", [_BUILTIN_DATA, _JSON_DATA], horizontal=True,
                      key="train_data_choice",
                      help="What the run fine-tunes on. Built-in tasks are generated on the "
                           "fly; your own data is a LLaVA-format JSON file with its images in "
                           "the file's folder (relative paths).")
    if choice == _BUILTIN_DATA:
        tasks = [n for n in builtin_names() if n != "upstream"]
        default = _defaults()["data"].removeprefix("builtin:")
        name = st.selectbox("Task", tasks, index=tasks.index(default) if default in tasks else 0,
                            key="train_task",
                            help="counting: how many shapes of a kind; digit-sum: the sum of "
                                 "two handwritten digits.")
        return f"builtin:{name}"
    typed = st.text_input("JSON file (or a folder holding data.json)", key="train_data_path",
                          placeholder="/path/to/data.json")
    path, reason = common.safe_path(typed, _allowed_roots())
    if path is None:
        problems.append(reason if typed.strip() else "Data: type the JSON file's path.")
        return typed
    reason = _check_cached("data", str(path), _mtime(str(path)))
    if reason:
        problems.append(_message(reason))
    else:
        st.caption(f"✓ `{path}`: {jobs.check_data(str(path), sample_images=0)}.")
    return str(path)


def _option_widget(method: str, field: dataclasses.Field):
    key = f"train_opt_{method}_{field.name}"
    help_text = field.metadata.get("help", "")
    if isinstance(field.default, bool):
        return st.checkbox(field.name, value=field.default, key=key, help=help_text)
    if isinstance(field.default, int):
        return st.number_input(field.name, value=field.default, step=1, key=key, help=help_text)
    if isinstance(field.default, float):
        return st.number_input(field.name, value=field.default, format="%g", key=key,
                               help=help_text)
    return st.text_input(field.name, value=str(field.default), key=key, help=help_text)


def _methods_input(problems: list[str]) -> dict[str, dict]:
    """Chosen methods and their options (only those changed from the defaults)."""
    # Names only, matched as typed text (not fuzzily), and no "Select all matches": with the
    # descriptions in the labels, "full" matched eight methods ("trains like full
    # fine-tuning") and Enter queued them all. Enter picks the first match, one method.
    methods = st.multiselect(
        "Methods", available_methods(),
        # no default once a preset has set the value (Streamlit warns of both)
        default=None if "train_methods" in st.session_state else ["spider"], key="train_methods",
        filter_mode="contains", select_all=False,
        help="Several methods run one after another, each its own run, with the same "
             "settings. What each method does is listed under the box.")
    if not methods:
        problems.append("Methods: choose at least one method.")
    for method in methods:
        st.caption(f"**{_plain(method)}**: {_plain(method_class(method).summary)}")
    with st.expander("What each method does", expanded=False):
        st.markdown("\n".join(f"- **{_plain(m)}**: {_plain(method_class(m).summary)}"
                              for m in available_methods()))
    chosen: dict[str, dict] = {}
    for method in methods:
        fields = option_fields(method)
        options = {}
        if fields:
            with st.expander(f"Options of {method}", expanded=False):
                for field in fields:
                    value = _option_widget(method, field)
                    if value != field.default:
                        options[field.name] = value
        try:
            jobs.check_options(method, options)
        except UserError as err:
            problems.append(str(err)[:1].upper() + str(err)[1:])
        chosen[method] = options
    return chosen


def _settings_input() -> dict:
    """The run's settings as typed. The number boxes have no ``min_value`` / ``max_value``: a
    number outside them is refused by the browser and never reaches this script, so the form
    went on with the previous value (and launched with it). Every number is checked here
    instead, by the runner's own rules (:func:`app.jobs.settings_problems`)."""
    d = _defaults()
    cols = st.columns(4)
    settings = {
        "steps": cols[0].number_input("Steps", value=d["steps"], step=10,
                                      key="train_steps", help="optimizer steps (at least 1)"),
        "lr": cols[1].number_input("Learning rate", value=d["lr"], step=1e-4,
                                   format="%.1e", key="train_lr", help="peak learning rate "
                                   "(AdamW, linear warm-up then cosine decay)"),
        "batch_size": cols[2].number_input("Batch size", value=d["batch_size"],
                                           key="train_batch", help="examples per step"),
        "seed": cols[3].number_input("Seed", value=d["seed"], key="train_seed",
                                     help="seed for data, order and method (0 or more)"),
    }
    cols = st.columns(4)
    settings["eval_every"] = cols[0].number_input(
        "Evaluate every (steps)", value=d["eval_every"], key="train_eval_every",
        help="score upstream and downstream every N steps (and at step 0 and the end); "
             "training pauses meanwhile")
    settings["save_every"] = cols[1].number_input(
        "Checkpoint every (steps)", value=d["save_every"], key="train_save_every",
        help="save weights and method state every N steps (and at the end); what Resume "
             "continues from")
    settings["hybrid_ratio"] = cols[2].number_input(
        "Hybrid ratio", value=d["hybrid_ratio"], step=0.05,
        key="train_hybrid", help="share of every batch drawn from the upstream data "
                                 "(data-hybrid training; 0 = off; below 1)")
    settings["device"] = cols[3].selectbox("Device", ["auto", "cpu", "cuda"],
                                           index=["auto", "cpu", "cuda"].index(d["device"]),
                                           key="train_device", help=_device_text())
    with st.expander("More settings"):
        cols = st.columns(4)
        settings["eval_limit"] = cols[0].number_input(
            "Test examples per evaluation", value=d["eval_limit"],
            key="train_eval_limit", help="per evaluated split (5 splits for a built-in task)")
        settings["train_size"] = cols[1].number_input(
            "Training examples", value=d["train_size"], key="train_size",
            help="0 = the dataset's default size")
        settings["log_every"] = cols[2].number_input(
            "Statistics every (steps)", value=d["log_every"], key="train_log_every",
            help="per-parameter statistics (mask density...) every N steps")
        settings["name"] = cols[3].text_input(
            "Run name", key="train_name", placeholder="method-task-date-time",
            help="the run's folder name (letters, digits, . _ -); one per method is made "
                 "unique by a suffix")
        from spider.models import TRAINABLE_PARTS

        default_parts = [p for p in d["train"].split(",") if p]
        parts = st.multiselect(
            "What trains", list(TRAINABLE_PARTS), default=default_parts, key="train_parts",
            help="llm, projector, vision: whole components; attn: only the q/k/v/o "
                 "projections of every decoder layer; mlp_gate_up: only the MLP's gate and "
                 "up projections (down frozen). Everything else stays frozen; any method "
                 "composes with it.")
        if parts != default_parts:
            settings["train"] = ",".join(parts)
    return settings


@st.cache_data(show_spinner=False, max_entries=64, ttl=60)
def _estimate(model: str, steps: int, batch: int, eval_every: int, eval_limit: int,
              device: str, run_paths: tuple[str, ...]) -> tuple[float, str] | None:
    found = watch.estimate(model, steps, batch, eval_every, eval_limit, run_paths, device)
    return (found.seconds, found.basis) if found else None


def _timing_runs(root: Path) -> list[str]:
    folder = root / jobs.QUEUE / "timings"
    return sorted(str(p) for p in folder.iterdir()) if folder.is_dir() else []


def _estimate_box(root: Path, model: str, settings: dict, runs_per_launch: int) -> None:
    """How long the launch will take, from earlier runs of the model (or a short timing)."""
    device = _resolved_device(settings["device"])
    paths = tuple([*(str(p) for p in common.list_all_runs()["path"]), *_timing_runs(root)])
    found = _estimate(resolve_model_path(model), int(settings["steps"]),
                      int(settings["batch_size"]), int(settings["eval_every"]),
                      int(settings["eval_limit"]), device, paths)
    if found:
        total = watch.duration_text(found[0] * runs_per_launch)
        st.info(f"Estimated time: about **{total}**"
                + (f" for {runs_per_launch} runs" if runs_per_launch > 1 else "")
                + f", plus loading the model — {found[1]}.", icon=":material/timer:")
        return
    st.info("No earlier run of this model on this device to estimate the time from. Time a "
            "few steps to get an estimate (a 5-step run of the runner, evaluating as the run "
            "will).",
            icon=":material/timer:")
    if st.button("Time a few steps", key="train_measure"):
        limit = max(1, min(int(settings["eval_limit"]), watch.MEASURE_EVAL_LIMIT))
        with st.spinner(f"Timing 5 steps (loading the model; two evaluations of {limit} "
                        "examples per split)…"):
            try:
                watch.measure(resolve_model_path(model), device, int(settings["batch_size"]),
                              root / jobs.QUEUE / "timings", eval_limit=limit)
            except UserError as err:
                st.error(f"The timing run failed: {err}")
                return
        st.rerun()


def _resolved_device(device: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def queued_text(methods: list[str]) -> str:
    """What Launch will queue, said next to it: "2 runs: spider, full" (one run per method)."""
    if not methods:
        return "Nothing to queue: choose a method."
    return f"{len(methods)} run{'s' if len(methods) != 1 else ''}: {', '.join(methods)}"


# ----------------------------------------------------------------------------- presets
@dataclasses.dataclass(frozen=True)
class Preset:
    """A launch set up in one click: these methods, every other field at its default."""

    label: str
    methods: tuple[str, ...]
    about: str


PRESETS = {
    "spider_vs_full": Preset(
        "SPIDER vs full", ("spider", "full"),
        "the bundled tiny LLaVA fine-tuned on the counting task twice, with SPIDER and with "
        "full fine-tuning, with the runner's default settings (together about a minute on a "
        "CPU). Both runs share one live chart: full fine-tuning's upstream score falls — it "
        "forgets — while SPIDER's holds"),
}
# /train?preset=NAME fills the form with PRESETS[NAME] (it never launches). A comment, not a
# docstring: Streamlit's "magic" would draw a bare string of a page script on the page.
PRESET_QUERY = "preset"
_PRESET_KEY = "train_preset"  # the preset last filled in (its note stays while it holds)
_FORM_KEYS = ("train_model_choice", "train_model_path", "train_data_choice", "train_data_path",
              "train_task", "train_steps", "train_lr", "train_batch", "train_seed",
              "train_eval_every", "train_save_every", "train_hybrid", "train_device",
              "train_eval_limit", "train_size", "train_log_every", "train_name", "train_parts")


def apply_preset(name: str) -> None:
    """Fill the form with preset ``name``: its methods, every other field (and every
    method's options) back to its default. Run before the widgets are drawn (a button's
    callback, or the address read at the top of the page)."""
    preset = PRESETS[name]
    for key in list(st.session_state):
        if key in _FORM_KEYS or str(key).startswith("train_opt_"):
            del st.session_state[key]
    st.session_state["train_methods"] = list(preset.methods)
    st.session_state[_PRESET_KEY] = name


def preset_from_address() -> str | None:
    """Apply ``?preset=NAME`` once (the parameter is then dropped from the address, so a
    later rerun keeps the user's edits); the preset's name, or None. An unknown name is
    said in one sentence."""
    asked = st.query_params.get(PRESET_QUERY)
    if asked is None:
        return None
    del st.query_params[PRESET_QUERY]
    if asked not in PRESETS:
        st.warning(f"The address asks for preset “{asked}”, which does not exist; the "
                   f"presets are: {', '.join(PRESETS)}.", icon=":material/warning:")
        return None
    apply_preset(asked)
    return asked


def _presets_row() -> None:
    cols = st.columns([1, 4], vertical_alignment="center")
    for name, preset in PRESETS.items():
        cols[0].button(preset.label, key=f"train_preset_{name}", on_click=apply_preset,
                       args=(name,), icon=":material/compare_arrows:",
                       help=f"Fill the form: {preset.about}.")
    cols[1].caption("A preset fills the form in; **Launch** starts it.")
    chosen = PRESETS.get(st.session_state.get(_PRESET_KEY, ""))
    if chosen and list(st.session_state.get("train_methods") or []) == list(chosen.methods):
        st.info(f"**{chosen.label}** is filled in: {chosen.about}. Press **Launch** to start.",
                icon=":material/compare_arrows:")


def new_run_form(root: Path) -> None:
    _presets_row()
    problems: list[str] = []
    left, right = st.columns(2, gap="large")
    with left:
        model = _model_input(problems)
        data = _data_input(problems)
    with right:
        methods = _methods_input(problems)
    settings = _settings_input()
    st.caption(_device_text())
    name = settings.pop("name", "").strip()
    if name:
        try:
            jobs.check_run_name(name)
        except UserError as err:
            problems.append(_message(str(err)))
    base = {**settings, "data": data}
    if model != str(_defaults()["model"]):
        base["model"] = model
    # every number, whatever else is wrong: each bad one is listed and Launch stays off
    if settings["seed"] < 0:
        problems.append(f"“Seed” must not be negative, not {settings['seed']}.")
    problems += [_message(p) for p in jobs.settings_problems(base)]

    if not problems:
        _estimate_box(root, model, settings, len(methods))
    for problem in problems:
        st.error(problem)
    launch_col, queued_col = st.columns([1, 5], vertical_alignment="center")
    queued_col.markdown(_plain(queued_text(list(methods))))
    if launch_col.button("Launch", type="primary", disabled=bool(problems), key="train_launch",
                         help=(f"Off until the {len(problems)} problem(s) listed above are "
                               "fixed." if problems
                               else "Queue the runs: they start one after another.")):
        runs = []
        for method, options in methods.items():
            run = {**base, "method": method, "options": options}
            if name:
                run["name"] = name if len(methods) == 1 else f"{name}-{method}"
            runs.append(run)
        try:
            launched = jobs.launch(root, runs)
        except UserError as err:
            st.error(_message(str(err)))
            return
        st.session_state[_WATCH_KEY] = launched[0].name
        st.toast(f"Queued {', '.join(j.name for j in launched)}")
        st.rerun()


# ----------------------------------------------------------------------------- live panel
def _watcher(run_dir: Path) -> watch.RunWatch:
    watchers = st.session_state.setdefault(_WATCHERS_KEY, {})
    key = str(run_dir)
    if key not in watchers:
        watchers[key] = watch.RunWatch(run_dir)
    return watchers[key]


def _status_line(root: Path, name: str, state: str, snap: watch.Snapshot | None) -> None:
    progress = snap.progress if snap else None
    if state == "queued":
        ahead = [v.name for v in jobs.jobs_overview(root) if v.state != "queued"]
        before = ", ".join(ahead) or "the run before it"
        st.info(f"Queued: starts when {before} has finished.", icon=":material/schedule:")
    elif state == "starting":
        st.progress(0.0, text="starting: loading the model and data…")
    elif state == "running" and progress is not None:
        total = progress.steps or 1
        st.progress(min(1.0, progress.step / total), text=watch.eta_text(progress))
    elif state == "done":
        summary = (jobs.run_info(root / name) or {}).get("summary") or {}
        scores = ""
        if all(k in summary for k in ("U", "D", "H")):
            scores = (f"Upstream score U = {summary['U']:.3f} (what it kept), downstream "
                      f"D = {summary['D']:.3f} (the task), H = {summary['H']:.3f}.")
        st.success(f"Done. {scores}", icon=":material/check_circle:")
    elif state == "failed":
        st.error(f"Failed: {_error_line(root, name, progress)}", icon=":material/error:")
    elif state == "cancelled" and snap is None:
        st.warning("Cancelled before it started training; nothing was written.",
                   icon=":material/stop_circle:")
    elif state == "cancelled":
        st.warning(cancelled_text(progress), icon=":material/stop_circle:")
    elif state == jobs.STOPPED_UNEXPECTEDLY:
        st.warning("Stopped unexpectedly: its process is gone (killed, or the machine "
                   "restarted). **Resume** continues from the last checkpoint.",
                   icon=":material/warning:")


def cancelled_text(progress) -> str:
    """What the panel says of a cancelled run: the step it reached, and where Resume goes on
    from (its last checkpoint)."""
    if progress is None:
        return ("Cancelled. Its checkpoints are kept; **Resume** continues from the last one.")
    of = f" of {progress.steps}" if progress.steps else ""
    if progress.saved_step is None:
        kept = "No checkpoint was saved, so **Resume** starts it over."
    else:
        kept = (f"Its checkpoints are kept; **Resume** continues from the last one, at step "
                f"{progress.saved_step}.")
    return f"Cancelled at step {progress.step}{of}. {kept}"


def _error_line(root: Path, name: str, progress) -> str:
    """The run's one-sentence reason: run.json's error, else the log's last ``error:``."""
    if progress is not None and progress.error:
        return str(progress.error)
    line = jobs.last_error_line(jobs.log_file(root, name))
    if line:
        return line.split(":", 1)[1].strip()
    ended = jobs.ended_record(root, name) or {}
    return f"the runner exited with code {ended.get('returncode')}; see {jobs.log_file(root, name)}"


def _actions(root: Path, name: str, state: str) -> None:
    if state in ("queued", "starting", "running"):
        if st.button("Cancel", key=f"train_cancel_{name}",
                     help="stop it: it saves a checkpoint and ends cancelled"):
            outcome = jobs.cancel(root, name)
            st.toast("Removed from the queue" if outcome == "dequeued"
                     else "Stopping: it saves a checkpoint first")
    elif state in jobs.RESUMABLE and (root / name / "run.json").exists():
        if st.button("Resume", key=f"train_resume_{name}",
                     help="continue from the last checkpoint"):
            try:
                jobs.resume(root, name)
            except UserError as err:
                st.error(str(err))
            st.rerun(scope="app")


def _runs_to_watch(root: Path) -> tuple[list[str], dict[str, str]]:
    """Names of the jobs and user runs, active first then newest, and their states."""
    states: dict[str, str] = {}
    for view in jobs.jobs_overview(root):
        states[view.name] = view.state
    for run_dir in jobs.iter_user_runs(root):
        states.setdefault(run_dir.name, jobs.run_status(run_dir))
    for view in jobs.ended_before_run(root):  # never got as far as writing run.json
        states.setdefault(view.name, view.state)
    return list(states), states


def launch_groups(root: Path, names: list[str]) -> dict[str, list[str]]:
    """The runs to watch together, in the order of ``names`` (active first, then newest):
    the runs one Launch queued form one group (in launch order, named by its first run
    still listed); every other run is a group of its own."""
    launched = jobs.launch_groups(root)
    listed = set(names)
    groups: dict[str, list[str]] = {}
    placed: set[str] = set()
    for name in names:
        if name in placed:
            continue
        members = [n for n in launched.get(name, [name]) if n in listed and n not in placed]
        groups[members[0]] = members
        placed.update(members)
    return groups


def _group_label(groups: dict[str, list[str]]):
    def label(key: str) -> str:
        members = groups.get(key, [key])
        return key if len(members) == 1 else f"{' + '.join(members)} ({len(members)} runs)"
    return label


def _colors(root: Path, group: list[str]) -> dict[str, str]:
    """Each run's colour as Compare gives it: every run listed, the bundled samples first,
    then the user's by name (their colour does not depend on the samples' order), taken once
    per group so that a colour never changes while the runs are watched."""
    from analysis.figures.style import run_colors

    cache = st.session_state.setdefault(_COLORS_KEY, {})
    key = (str(root), tuple(group))
    if key not in cache:
        ids = set(common.list_all_runs()["id"]) | set(group)
        samples = sorted(i for i in ids if i.startswith(common.SAMPLES_PREFIX))
        yours = sorted(i for i in ids if not i.startswith(common.SAMPLES_PREFIX))
        every = run_colors([*samples, *yours])
        cache[key] = {name: every[name] for name in group}
    return cache[key]


def _run_block(root: Path, name: str, state: str, color: str | None):
    """One run of the watched group: its name (in its chart colour), state, progress or how
    it ended, and Cancel / Resume. Returns its watcher and snapshot (None before run.json)."""
    run_dir = root / name
    info = jobs.run_info(run_dir) or {}
    config = info.get("config") or {}
    what = " · ".join(str(x) for x in (info.get("method"), config.get("data")) if x)
    # the chart's colour of the run beside its name (a hex colour of the run palette only)
    shown = f"**{name}**"
    if color and re.fullmatch(r"#[0-9A-Fa-f]{6}", color):
        shown = f'<span style="color:{color}">■</span> ' + shown
    st.markdown(f"{shown} — {_STATE_LABELS.get(state, state)}" + (f" · {what}" if what else ""),
                unsafe_allow_html=True)
    evaluated_on = overview.eval_text(info) if info else ""
    if evaluated_on:
        st.caption(f"Downstream score (D) measured on: {evaluated_on}.")
    w = snap = None
    if (run_dir / "run.json").exists():
        w = _watcher(run_dir)
        snap = w.poll()
    _status_line(root, name, state, snap)
    _actions(root, name, state)
    return w, snap


def live_panel(root: Path) -> None:
    """The fragment's body: which launch, each of its runs' status, progress and actions,
    and one live chart of all of them (a colour per run, as on Compare)."""
    started = time.perf_counter()
    names, states = _runs_to_watch(root)
    if not names:
        st.caption(f"No runs in `{root}` yet: launch one above.")
        return
    groups = launch_groups(root, names)
    if st.session_state.get(_WATCH_KEY) not in groups:
        st.session_state[_WATCH_KEY] = next(iter(groups))
    key = st.selectbox("Run", list(groups), key=_WATCH_KEY, format_func=_group_label(groups),
                       help="queued and running jobs first, then your runs, newest first; "
                            "the runs of one Launch are shown together")
    group = groups[key]
    colors = _colors(root, group) if len(group) > 1 else {}
    watched = []
    for name in group:
        with st.container(border=len(group) > 1):
            w, snap = _run_block(root, name, states[name], colors.get(name))
        if snap is not None:
            watched.append((w, snap))
    written = [n for n in group if (root / n / "run.json").exists()]
    if written and any(states[n] == "done" for n in group):
        st.page_link("views/compare.py", label="Open in Compare",
                     icon=":material/compare_arrows:", query_params={common.QUERY_KEY: written},
                     help=f"the Compare page with {', '.join(written)} selected")
    if watched:
        _live_charts(root, watched, colors, states)
    busy_now = any(s in ("queued", "starting", "running") for s in states.values())
    st.session_state["train_refresh_ms"] = (time.perf_counter() - started) * 1000
    if busy_now != st.session_state.get("train_busy", False):
        st.session_state["train_busy"] = busy_now
        st.rerun(scope="app")  # start or stop refreshing


def _live_charts(root: Path, watched: list, colors: dict[str, str], states: dict) -> None:
    """Scores and loss of every watched run on one chart each; the layer heatmap of one."""
    names = [w.name for w, _ in watched]
    cache = st.session_state.setdefault(_FIGS_KEY, {}).setdefault(tuple(names), {})
    loss, scores = watch.live_curves(watched, cache, colors)
    tag = "_".join(names)
    if scores is not None:
        presentation.show_figure(scores, key=f"train_scores_{tag}")
    else:
        st.caption("Scores appear when the step-0 evaluation (the base model) ends.")
    if loss is not None:
        presentation.show_figure(loss, key=f"train_loss_{tag}")
    # the heatmap is one run's: the one picked, else the run training now, else the first
    by_name = dict(zip(names, watched))
    if st.session_state.get(_HEAT_RUN_KEY) not in by_name:
        running = [n for n in names if states.get(n) == "running"]
        st.session_state[_HEAT_RUN_KEY] = (running or names)[0]
    if len(names) > 1:
        st.radio("Layer heatmap of", names, key=_HEAT_RUN_KEY, horizontal=True)
    w, snap = by_name[st.session_state[_HEAT_RUN_KEY]]
    # the heatmap's statistic (chosen by the selectbox below, kept in the session)
    w.heatmap_value = st.session_state.get(_HEAT_KEY, "mask_density")
    heat = watch.live_heatmap(w, snap, cache, titled=len(names) > 1)
    if heat is not None:
        st.selectbox(  # the statistics of the vocabulary (spider.statistics)
            "Heatmap shows", list(watch.LIVE_HEATMAP_VALUES), key=_HEAT_KEY,
            format_func=watch.live_value_label)
        presentation.show_figure(heat, key=f"train_heat_{w.name}")
    else:
        config = (jobs.run_info(root / w.name) or {}).get("config") or {}
        every = config.get("log_every", "N")
        what = "The layer heatmap appears" if loss is not None else (
            "The loss curve and the layer heatmap appear")
        st.caption(f"{what} as statistics are logged (every {every} steps).")


def explain_panel(root: Path) -> None:
    """Queue ``python -m analysis.attribute`` for a finished run of the user's; list those
    jobs with their state and log (the "Why it forgot" page shows the result)."""
    done = [p.name for p in jobs.iter_user_runs(root) if jobs.run_status(p) == "done"]
    if not done:
        st.caption("No finished run of yours yet: once one is done it can be explained here.")
    else:
        c1, c2, c3 = st.columns([3, 2, 1], vertical_alignment="bottom")
        name = c1.selectbox("Finished run", done, key="train_explain_run")
        by = c2.selectbox("Grouped by", jobs.ATTRIBUTE_BY, key="train_explain_by",
                          help="component: vision, projector, LLM; layer: each block; "
                               "module: each kind of weight across the layers. About one "
                               "evaluation per group.")
        if c3.button("Queue", key="train_explain_queue"):
            try:
                job = jobs.queue_attribution(root, root / name, by)
                st.toast(f"Queued {job.name}")
                st.rerun(scope="app")  # start refreshing
            except UserError as err:
                st.error(str(err))
    views = jobs.attribution_jobs(root) if root.is_dir() else []
    for view in views[:5]:
        text = (f"**{view.name}** — {_STATE_LABELS.get(view.state, view.state)} · "
                f"`python -m analysis.attribute {view.target.name} {' '.join(view.args)}`")
        st.markdown(text)
        if view.error:
            st.error(view.error)
        if view.state == "done":
            st.page_link("views/forgetting.py", label=f"See why {view.target.name} forgot",
                         icon=":material/arrow_forward:",
                         query_params={common.QUERY_KEY: [view.target.name]})
        if view.log.is_file():
            with st.expander("Log", expanded=False):
                st.code(view.log.read_text(errors="replace")[-4000:], language="text")
    active = any(v.state in ("queued", "running") for v in views)
    if active != st.session_state.get("train_explain_busy", False):
        st.session_state["train_explain_busy"] = active
        st.rerun(scope="app")  # start or stop refreshing


# ----------------------------------------------------------------------------- the page
st.title("Train")
st.caption("Fine-tune the model with one or several methods and watch each run as it goes. "
           "Runs train in the background, one after another: closing the tab does not stop "
           "them, and every run lands in your runs folder for the Compare, Layers and "
           "Parameters pages.")
root = common.user_runs_root()
if root.is_dir():
    jobs.ensure_supervisor(root)  # jobs left queued by a crash or a reboot start again
busy = root.is_dir() and jobs.anything_running(root)
st.session_state["train_busy"] = busy

preset = preset_from_address()  # before the form's widgets: it sets their values
with st.expander("New run", expanded=not busy or preset is not None):
    new_run_form(root)

st.subheader("Runs")
st.fragment(run_every=REFRESH_S if busy else None)(live_panel)(root)

st.subheader("Explain a finished run")
st.caption("Revert each part of a finished run's update and score it again: which part made "
           "it forget. Queued like a training run; the result shows on the Why it forgot page.")
explaining = st.session_state.get("train_explain_busy", False)
st.fragment(run_every=2 * REFRESH_S if explaining else None)(explain_panel)(root)
