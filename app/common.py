"""What every page of the app shares: where runs live, the cached readers, the run selection.

* **Runs roots.** The bundled sample runs (:func:`bundled_runs_root`) and the user's folder
  (:func:`user_runs_root`: ``SPIDERSCOPE_RUNS``, else ``./runs`` of the working directory, or
  what the sidebar sets for this session).
* **Cached reads.** :func:`list_all_runs` re-lists only runs whose files changed (a run's
  signature is the mtimes and sizes of its few top-level files), so a growing run is re-read
  and a finished one never is; :func:`load_run_cached` keys a :class:`analysis.Run` the same
  way. Listing never opens a tensor.
* **Selection.** :func:`selected_runs` / :func:`set_selected_runs` keep the chosen runs in the
  session and in the URL (``?runs=...``), so they carry from page to page and survive a reload
  or a shared link.
* **Paths typed by a user** go through :func:`safe_path`, against :func:`allowed_roots`:
  exactly the repository, the configured runs folders and ``SPIDERSCOPE_ROOTS`` (never the
  home or working folder as such, never ``/`` or a system folder).

Streamlit is imported here (and in the pages), never in ``analysis`` or ``spider``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd
import streamlit as st

import analysis
from spider import rundir
from spider.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
RUNS_ENV = "SPIDERSCOPE_RUNS"
# further folders (os.pathsep-separated) where models and data typed on the Train page may
# be, for those kept outside the home folder (a shared /data, a mounted disk)
EXTRA_ROOTS_ENV = "SPIDERSCOPE_ROOTS"
QUERY_KEY = "runs"
SAMPLES_PREFIX = "samples/"
"""Run ids of bundled sample runs start with this (``samples/spider``); the user's runs are
named by their path under the user's runs folder."""

# Statuses that are not results: shown in the runs table, left out of result charts unless
# asked for. "damaged" is Spiderscope's label for a run whose files cannot be read.
NOT_RESULTS = ("failed", "cancelled", "damaged", "stopped unexpectedly")
# Background colours of the status cell in runs tables (text stays the plain status word:
# no emoji, which some systems cannot draw).
STATUS_COLORS = {
    "done": "",
    "running": "background-color: #dbeafe",
    "queued": "background-color: #e5e7eb",
    "failed": "background-color: #fecaca",
    "cancelled": "background-color: #fde68a",
    "damaged": "background-color: #d1d5db",
    "stopped unexpectedly": "background-color: #fed7aa",
}

_USER_ROOT_KEY = "spiderscope_user_runs_root"
_SELECTION_KEY = "spiderscope_selected_runs"
# A running run's row is re-read at least this often even when no file changed, so that a
# process that died shows as "stopped unexpectedly" (liveness is not a file change).
_RUNNING_RECHECK_S = 5.0


# --------------------------------------------------------------------------------------------
# Roots
# --------------------------------------------------------------------------------------------


def bundled_runs_root() -> Path:
    """The sample runs shipped in the repository."""
    return REPO_ROOT / "sample_checkpoints" / "runs"


def default_user_runs_root() -> Path:
    """``SPIDERSCOPE_RUNS`` if set, else ``./runs``, resolved against the working directory."""
    text = os.environ.get(RUNS_ENV, "").strip()
    return Path(os.path.abspath(os.path.expanduser(text or "runs")))


def user_runs_root() -> Path:
    """Where the user's runs are (and where the Train page writes new ones): the sidebar's
    choice for this session (a configured folder or one inside it), else
    :func:`default_user_runs_root`. It may not exist yet."""
    chosen = st.session_state.get(_USER_ROOT_KEY)
    if chosen and _inside(Path(chosen), configured_roots()):
        return Path(chosen)
    return default_user_runs_root()


def set_user_runs_root(path: str | os.PathLike | None) -> None:
    """Use ``path`` as the user's runs folder for this session (None: back to the default)."""
    if path is None:
        st.session_state.pop(_USER_ROOT_KEY, None)
    else:
        st.session_state[_USER_ROOT_KEY] = str(Path(path).resolve())


def runs_roots() -> list[Path]:
    """The folders runs are listed from: the bundled samples, then the user's folder (unless
    that is ``/`` or a system folder: see :func:`system_folder`)."""
    roots = [bundled_runs_root().resolve()]
    user = user_runs_root()
    if user.resolve() != roots[0] and not system_folder(user):
        roots.append(user)
    return roots


def extra_roots() -> list[Path]:
    """The folders ``SPIDERSCOPE_ROOTS`` names (``os.pathsep``-separated), as given."""
    text = os.environ.get(EXTRA_ROOTS_ENV, "")
    return [Path(os.path.abspath(os.path.expanduser(p.strip())))
            for p in text.split(os.pathsep) if p.strip()]


# Never a runs folder nor a folder a typed path may be in: the system's own folders, with
# everything inside them...
_SYSTEM_TREES = ("/etc", "/proc", "/sys", "/dev", "/boot", "/bin", "/sbin", "/lib", "/lib32",
                 "/lib64", "/libx32", "/usr", "/var", "/run", "/snap")
# ...and folders too broad to be one, though a folder inside them may be (/root/runs when
# the app runs as root in a container, /home/me/runs).
_TOO_BROAD = ("/", "/root", "/home", "/mnt", "/media", "/srv", "/opt", "/tmp")


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(str(path))))


def system_folder(path: str | os.PathLike) -> str:
    """What ``path`` (symlinks followed) is when it may never be a runs folder — ``"the whole
    file system"``, ``"the home folder"``, ``"a system folder"`` (/etc, /usr, /proc... or
    anything inside one), ``"a folder too broad to hold runs"`` (/home, /tmp...) — else ``""``."""
    real = _real(path)
    if real == Path("/"):
        return "the whole file system"
    if real == _real(Path.home()):
        return "the home folder"
    if any(real == Path(t) or Path(t) in real.parents for t in _SYSTEM_TREES):
        return "a system folder"
    if real in {Path(p) for p in _TOO_BROAD}:
        return "a folder too broad to hold runs"
    return ""


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    real = _real(path)
    return any(real == r or r in real.parents for r in roots)


def _distinct(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """``paths`` resolved, system folders and those inside another one of them left out."""
    real = [_real(p) for p in paths]
    real = [p for p in real if not system_folder(p)]
    kept: list[Path] = []
    for i, path in enumerate(real):
        covered = any((other in path.parents) or (other == path and j < i)
                      for j, other in enumerate(real) if j != i)
        if not covered:
            kept.append(path)
    return kept


def configured_roots() -> list[Path]:
    """The folders the administrator configured: the repository (bundled samples and model),
    the default runs folder (``SPIDERSCOPE_RUNS`` or ``./runs``) and ``SPIDERSCOPE_ROOTS``,
    each once (one inside another counts once), never ``/`` or a system folder. The sidebar
    chooses the runs folder among these (or a folder inside one)."""
    return _distinct([REPO_ROOT, bundled_runs_root(), default_user_runs_root(),
                      *extra_roots()])


def allowed_roots() -> list[Path]:
    """Where a path typed in the app (a model, a data file) may be: exactly the repository,
    the runs folders and ``SPIDERSCOPE_ROOTS`` — not the home or working folder as such."""
    return _distinct([*configured_roots(), *runs_roots()])


# --------------------------------------------------------------------------------------------
# Paths typed by a user
# --------------------------------------------------------------------------------------------


def safe_path(user_text: str, roots: Sequence[str | os.PathLike], *,
              must_exist: bool = True) -> tuple[Path | None, str]:
    """Resolve a path a user typed, refusing anything outside ``roots``.

    Relative paths are taken against the working directory. ``..`` components are refused
    outright (they are how a path escapes), and the resolved path (symlinks followed) must lie
    inside one of the resolved ``roots``. Returns ``(path, "")`` or ``(None, reason)``, the
    reason one sentence that names the path, for ``st.error``.
    """
    text = (user_text or "").strip()
    if not text:
        return None, "No path given: type a folder path."
    if "\x00" in text:
        return None, f"The path {text!r} contains a NUL character."
    raw = Path(os.path.expanduser(text))
    if ".." in raw.parts:
        return None, f"The path {text} contains '..'; give it without parent-folder steps."
    resolved = Path(os.path.realpath(raw if raw.is_absolute() else Path.cwd() / raw))
    if must_exist and not resolved.exists():
        return None, f"The path {text} does not exist."
    allowed = _distinct(roots)
    if not any(resolved == r or r in resolved.parents for r in allowed):
        where = ", ".join(str(r) for r in allowed) or "(none)"
        return None, (f"The path {text} is outside the folders this app may read ({where}).")
    return resolved, ""


# --------------------------------------------------------------------------------------------
# Listing runs (cached per run, never loads tensors)
# --------------------------------------------------------------------------------------------


def _stat_key(path: Path) -> tuple[int, int]:
    try:
        info = path.stat()
    except OSError:
        return (0, -1)
    return (info.st_mtime_ns, info.st_size)


def run_signature(path: str | os.PathLike) -> tuple:
    """What changes when a run writes anything a list or a page shows: the mtime and size of
    run.json, metrics.jsonl, layers.jsonl, the folder of a large run's statistics parts (a
    part renamed in changes it) and the checkpoints folder. Cheap (five ``stat``)."""
    path = Path(path)
    return tuple(_stat_key(path / name) for name in (
        rundir.RUN_FILE, rundir.METRICS_FILE, rundir.LAYERS_FILE, rundir.LAYERS_PARTS_DIR,
        rundir.CHECKPOINTS))


def find_run_dirs(root: Path) -> list[Path]:
    """Every folder under ``root`` holding a run.json (not descending into a run's
    checkpoints or resume folders, nor hidden folders). Only ``scandir``: no file is read."""
    found: list[Path] = []
    if not root.is_dir():
        return found
    skip = {rundir.CHECKPOINTS, rundir.RESUME}
    for folder, subfolders, files in os.walk(root):
        subfolders.sort()
        if rundir.RUN_FILE in files:
            found.append(Path(folder))
            subfolders[:] = [d for d in subfolders if d not in skip]
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
    return found


@st.cache_data(show_spinner=False, max_entries=4096)
def _run_row(path: str, signature: tuple, recheck: int) -> pd.DataFrame:
    """``analysis.list_runs`` of one run folder, plus the columns of the runs table."""
    del signature, recheck  # cache key only
    from analysis import overview

    return overview.run_overview(path)


def run_id(path: Path, root: Path, bundled: bool) -> str:
    relative = path.relative_to(root).as_posix()
    if relative == ".":
        relative = path.name
    return SAMPLES_PREFIX + relative if bundled else relative


def readable_runs_or_stop() -> pd.DataFrame:
    """The runs of :func:`list_all_runs` that can be read (not ``damaged``); with none, the
    page says where the bundled samples live and stops."""
    runs = list_all_runs()
    readable = runs[runs["status"] != "damaged"]
    if readable.empty:
        st.info("No readable runs found. The bundled samples live in "
                f"`{bundled_runs_root()}`.")
        st.stop()
    return readable


def list_all_runs() -> pd.DataFrame:
    """Every run of :func:`runs_roots`, one row each, bundled samples first.

    Columns: ``id`` (what the URL holds), ``root`` (``samples`` or ``yours``) and the columns
    of :func:`analysis.overview.run_overview` (``path``, ``name``, ``method``, ``options``,
    ``data``, ``status`` — ``damaged`` for an unreadable run —, ``steps``, U, D, H, E, F, O,
    ``problem``...). Runs that appear, grow or end are picked up on the next call; unchanged
    runs come from the cache.
    """
    from analysis import overview

    found, ids, where = [], [], []
    bundled = bundled_runs_root().resolve()
    bucket = int(time.time() // _RUNNING_RECHECK_S)
    seen: set[str] = set()
    for root in runs_roots():
        is_bundled = root.resolve() == bundled
        for folder in find_run_dirs(root):
            # a run that says "running" is re-read every few seconds (its process may be gone)
            recheck = bucket if _says_running(folder) else 0
            found.append((str(folder), run_signature(folder), recheck))
            rid = run_id(folder, root, is_bundled)
            while rid in seen:
                rid += "'"
            seen.add(rid)
            ids.append(rid)
            where.append("samples" if is_bundled else "yours")
    if not found:
        return pd.DataFrame(columns=["id", "root", *overview.OVERVIEW_COLUMNS])
    # Every page lists the runs on every rerun (twice: the URL sync and the page): with
    # hundreds of runs, one cache lookup per run costs more than the page (issue 24). So the
    # whole table is kept, keyed by every run's folder, signature and recheck, and only a
    # change anywhere goes back to the per-run cache.
    key = (tuple(found), tuple(ids), tuple(where))
    table = _LISTINGS.get(key)
    if table is None:
        # the two columns added once to the whole table, not to each row
        table = pd.concat([_run_row(*f) for f in found], ignore_index=True)
        table.insert(0, "id", ids)
        table.insert(1, "root", where)
        with _LISTINGS_LOCK:  # sessions run in threads of one process
            while len(_LISTINGS) >= 8:  # the latest few (several runs folders, sessions)
                _LISTINGS.pop(next(iter(_LISTINGS)))
            _LISTINGS[key] = table
    return table.copy()


# list_all_runs' whole tables, by key (insertion order: the oldest is dropped first)
_LISTINGS: dict[tuple, pd.DataFrame] = {}
_LISTINGS_LOCK = threading.Lock()


def _says_running(folder: Path) -> bool:
    # run.json is small; reading its status costs ~0.1 ms and saves a full re-list
    try:
        text = (folder / rundir.RUN_FILE).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return '"status": "running"' in text or '"status":"running"' in text


def status_style(status: str) -> str:
    """CSS for a status cell (``Styler.map``): failed, cancelled, damaged and stopped runs
    stand out by colour."""
    return STATUS_COLORS.get(str(status), "")


def result_runs(runs: pd.DataFrame, include_not_results: bool = False) -> pd.DataFrame:
    """Rows of ``runs`` whose results belong in charts: all but failed, cancelled, damaged
    and stopped-unexpectedly runs (unless ``include_not_results``)."""
    if include_not_results:
        return runs
    return runs[~runs["status"].isin(NOT_RESULTS)]


# --------------------------------------------------------------------------------------------
# Loading one run (cached by its signature)
# --------------------------------------------------------------------------------------------


@st.cache_resource(show_spinner=False, max_entries=64)
def _load_run(path: str, signature: tuple) -> analysis.Run:
    del signature
    return analysis.load_run(path)


def load_run_cached(path: str | os.PathLike) -> analysis.Run:
    """The :class:`analysis.Run` of ``path``, shared between sessions; a new object whenever
    the run has written something since (:func:`run_signature`). Raises ``UserError`` for a
    folder that is not a readable run."""
    return _load_run(str(Path(path).resolve()), run_signature(path))


@st.cache_data(show_spinner=False, max_entries=256)
def _frame(path: str, signature: tuple, what: str) -> pd.DataFrame:
    return getattr(_load_run(path, signature), what)


def run_frame(path: str | os.PathLike, what: str) -> pd.DataFrame:
    """``metrics``, ``train``, ``layers`` or ``summary`` of one run, cached by signature
    (a copy: change it freely)."""
    resolved = str(Path(path).resolve())
    return _frame(resolved, run_signature(resolved), what)


def runs_frame(paths: Iterable[str | os.PathLike], what: str,
               labels: Sequence[str] | None = None) -> pd.DataFrame:
    """``what`` of several runs, one after another, ``run`` set to ``labels`` if given."""
    paths = list(paths)
    parts = []
    for i, path in enumerate(paths):
        frame = run_frame(path, what)
        if labels is not None:
            frame = frame.assign(run=labels[i])
        parts.append(frame)
    non_empty = [p for p in parts if not p.empty]
    if not non_empty:
        return parts[0].iloc[0:0] if parts else pd.DataFrame()
    return pd.concat(non_empty, ignore_index=True)


# --------------------------------------------------------------------------------------------
# Selection of runs: session state + URL
# --------------------------------------------------------------------------------------------


def _ids_from_url() -> list[str]:
    values = st.query_params.get_all(QUERY_KEY)
    ids: list[str] = []
    for value in values:
        ids.extend(v for v in value.split(",") if v)
    return ids


def _paths_from_url(runs: pd.DataFrame) -> list[str]:
    """The runs that ``?runs=`` names (by id, or by folder name), in URL order."""
    by_id = dict(zip(runs["id"], runs["path"]))
    by_name = dict(zip(runs["name"], runs["path"]))
    chosen: list[str] = []
    for rid in _ids_from_url():
        path = by_id.get(rid) or by_name.get(rid)
        if path and path not in chosen:
            chosen.append(path)
    return chosen


def selected_runs(runs: pd.DataFrame | None = None,
                  default: Sequence[str] | None = None) -> list[str]:
    """Paths of the chosen runs, in the order chosen (those that no longer exist dropped).

    The first call of a session takes them from the URL (``?runs=samples/spider&runs=...``),
    so a link or a reload keeps them; with nothing in the URL, ``default`` (paths) if given.
    """
    runs = list_all_runs() if runs is None else runs
    if _SELECTION_KEY not in st.session_state:
        chosen = _paths_from_url(runs)
        if not chosen and default is not None and not _ids_from_url():
            chosen = [str(p) for p in default]
        st.session_state[_SELECTION_KEY] = chosen
        _write_url(runs)
    present = set(runs["path"])
    return [p for p in st.session_state[_SELECTION_KEY] if p in present]


def set_selected_runs(paths: Iterable[str | os.PathLike], runs: pd.DataFrame | None = None
                      ) -> None:
    """Choose these runs (paths as in :func:`list_all_runs`) and write them to the URL."""
    st.session_state[_SELECTION_KEY] = [str(p) for p in paths]
    _write_url(list_all_runs() if runs is None else runs)


def sync_url(runs: pd.DataFrame | None = None) -> None:
    """Write the selection to ``?runs=`` (every page calls this: Streamlit drops query
    parameters when the page changes).

    A URL that names runs other than the session's selection comes from a link followed
    within the session (``st.page_link(..., query_params={"runs": ...})``, e.g. the Learn
    page's "start here" links): those runs become the selection.
    """
    if _SELECTION_KEY not in st.session_state and not _ids_from_url():
        return
    runs = list_all_runs() if runs is None else runs
    from_url = _paths_from_url(runs)
    if from_url and from_url != st.session_state.get(_SELECTION_KEY):
        st.session_state[_SELECTION_KEY] = from_url
    _write_url(runs)


def _write_url(runs: pd.DataFrame) -> None:
    id_of = dict(zip(runs["path"], runs["id"]))
    ids = [id_of[p] for p in st.session_state[_SELECTION_KEY] if p in id_of]
    if st.query_params.get_all(QUERY_KEY) != ids:
        if ids:
            st.query_params[QUERY_KEY] = ids
        elif QUERY_KEY in st.query_params:
            del st.query_params[QUERY_KEY]


def run_label(runs: pd.DataFrame, path: str) -> str:
    """How tables and charts name a run: its id (``samples/spider``, ``my-run``)."""
    match = runs.loc[runs["path"] == path, "id"]
    return str(match.iloc[0]) if len(match) else Path(path).name


# --------------------------------------------------------------------------------------------
# Sidebar
# --------------------------------------------------------------------------------------------


_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def sidebar() -> None:
    """The part of the sidebar every page shares: where runs are read from (and a warning
    when the server listens beyond this machine)."""
    with st.sidebar:
        address = st.get_option("server.address")
        if address not in _LOOPBACK:
            st.warning(
                f"This app listens on {address or 'every network address'}: anyone who can "
                "reach this machine can read your runs and start training. Start it from the "
                "repository root (`make app`), whose .streamlit/config.toml binds 127.0.0.1.")
        st.caption("**Runs**")
        user = user_runs_root()
        with st.expander("Where runs are read from", expanded=False):
            st.markdown(
                f"- bundled samples: `{_short(bundled_runs_root())}`\n"
                f"- your runs: `{_short(user)}`"
                + ("" if user.is_dir() else " (does not exist yet)")
            )
            if system_folder(user):
                st.error(f"The runs folder {user} (${RUNS_ENV}) is {system_folder(user)}, so no "
                         "runs are read from it: set it to the folder that holds your runs.")
            typed = st.text_input(
                "Your runs folder", value=str(user), key="spiderscope_runs_folder_input",
                help=f"Defaults to ${RUNS_ENV} or ./runs. Any folder inside "
                     f"{', '.join(_short(r) for r in configured_roots())} (add folders with "
                     f"${EXTRA_ROOTS_ENV}). Runs that appear there show up without a restart.",
            )
            if typed.strip() and Path(os.path.expanduser(typed.strip())) != user:
                problem = check_runs_folder(typed)
                if problem:
                    st.error(problem)
                else:
                    set_user_runs_root(Path(os.path.expanduser(typed.strip())))
                    st.rerun()


def check_runs_folder(text: str) -> str:
    """'' when ``text`` is a usable runs folder, else why not (one sentence).

    A runs folder is one of :func:`configured_roots` or a folder inside one — never ``/``,
    the home folder or a system folder (the Train page reads models and data from the runs
    folder, so choosing ``/`` would open the whole machine to it)."""
    text = text.strip()
    path = Path(os.path.expanduser(text))
    if not path.exists():
        return f"The runs folder {text} does not exist."
    if not path.is_dir():
        return f"{text} is a file, not a folder of runs."
    if system_folder(path):
        return (f"{text} is {system_folder(path)}, not a folder of runs: choose the folder "
                "that holds your runs.")
    roots = configured_roots()
    if not _inside(path, roots):
        return (f"The runs folder {text} is outside the folders this app may read "
                f"({', '.join(str(r) for r in roots)}); add it to ${EXTRA_ROOTS_ENV} to use it.")
    if not os.access(path, os.R_OK | os.X_OK):
        return f"The runs folder {text} cannot be read (permission denied)."
    return ""


def _short(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


__all__ = [
    "NOT_RESULTS", "QUERY_KEY", "REPO_ROOT", "RUNS_ENV", "UserError", "allowed_roots",
    "bundled_runs_root", "check_runs_folder", "configured_roots", "default_user_runs_root", "find_run_dirs", "list_all_runs",
    "load_run_cached", "result_runs", "run_frame", "run_label", "run_signature", "runs_frame",
    "runs_roots", "safe_path", "selected_runs", "set_selected_runs", "set_user_runs_root",
    "sidebar", "status_style", "sync_url", "system_folder", "user_runs_root",
]
