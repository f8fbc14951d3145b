"""A warm fork server for training children (see ``harness.py``); not a test module.

Imports what ``spider.train`` imports (lazily) once, then serves JSON-line requests on stdin:

* ``{"op": "start", "argv": [...], "log": PATH, "faults": {...}}`` -> ``{"pid": N}``: fork a
  child that runs ``spider.train.main(argv)`` with stdout and stderr going to ``PATH``
  (``faults``, optional: see :func:`child`);
* ``{"op": "poll", "pid": N}`` -> ``{"code": C}``: the child's exit code (negative: killed by
  that signal), or ``null`` while it runs;
* ``{"op": "cpu"}`` -> ``{"children_cpu_s": S, "own_cpu_s": T}``: CPU seconds of the
  children ended so far, and of the server itself.

It ends when its stdin closes (the test process ended).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path


def warm() -> None:
    """Import what a training run would import on its way (saves seconds per child)."""
    import torch

    torch.set_num_threads(1)
    import peft  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401
    import torch.distributed.tensor  # noqa: F401
    from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: F401
    from transformers.models.clip import modeling_clip  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401
    from transformers.models.llava import modeling_llava, processing_llava  # noqa: F401

    import spider.data.collate  # noqa: F401
    import spider.evaluate  # noqa: F401
    import spider.methods  # noqa: F401
    import spider.metrics  # noqa: F401
    import spider.train  # noqa: F401
    from spider.data import digits

    digits.pool("train")  # scikit-learn's digit scans, read once (numpy arrays)


def inject_enospc(on_call: int) -> None:
    """Make the ``on_call``-th safetensors file write of a checkpoint or resume state (and
    every later safetensors write) fail as a full disk does: part of the file gets out, then ``OSError(ENOSPC)``. Portable stand-in for
    a size-limited file system (which needs mount rights)."""
    import errno

    import spider.rundir

    original = spider.rundir.save_file
    calls = [0]

    def save_file(tensors, filename, *args, **kwargs):
        folder = Path(filename).parent
        if folder.parent.name == "checkpoints" or "resume" in folder.name:
            calls[0] += 1  # checkpoint and resume-state files only (not other run files)
        if calls[0] >= on_call:
            with open(filename, "wb") as handle:
                handle.write(b"\x00" * 65536)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return original(tensors, filename, *args, **kwargs)

    spider.rundir.save_file = save_file


def inject_nan_gradient(at_step: int) -> None:
    """Make one gradient entry NaN at optimizer step ``at_step`` (counted from 1), as an
    overflowing backward pass would, while the loss stays finite: the gradients reach the
    loop's clipping (``torch.nn.utils.clip_grad_norm_``) with the NaN in them."""
    import torch

    original = torch.nn.utils.clip_grad_norm_
    calls = [0]

    def clip_grad_norm_(parameters, *args, **kwargs):
        parameters = list(parameters)
        calls[0] += 1
        if calls[0] == at_step:
            first = next(p for p in parameters if p.grad is not None)
            first.grad.view(-1)[0] = float("nan")
        return original(parameters, *args, **kwargs)

    torch.nn.utils.clip_grad_norm_ = clip_grad_norm_


def inject_sigterm_at_first_evaluation() -> None:
    """Send this process SIGTERM as its step-0 evaluation starts: after run.json is
    written, before the first training step (the window a 'stop' button can hit while a
    large model loads its evaluation)."""
    import signal

    import spider.hooks

    original = spider.hooks.Evaluator.evaluate

    def evaluate(self, step):
        if step == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, step)

    spider.hooks.Evaluator.evaluate = evaluate


# ------------------------------------------------------------------------- file-change events
# The events by which a run changes its files, seen from outside the code that makes them:
# Python's audit events (opens for writing, renames and replaces, removals, folder creations
# and removals) and safetensors file writes (written from Rust, so seen at the Python call:
# the harness wraps ``safetensors.torch.save_file`` in the child). Kills are placed by the
# number of such events, never by waiting for names the code chooses; names only serve to
# say, afterwards, which kind of write an event belonged to.
EVENT_KINDS = ("checkpoint", "resume state", "run.json", "logs", "other")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
SAVE_FILE_EVENT = "spiderscope.faults.save_file"


def classify(paths: list[str]) -> str:
    """The kind of write an event belongs to, from the paths it touches (relative to the
    run directory): the first path that tells wins."""
    for path in paths:
        parts = path.replace(os.sep, "/").split("/")
        if "checkpoints" in parts or any(p.startswith(".tmp-step-") for p in parts):
            return "checkpoint"
        if any(p == "resume" or p.startswith(".tmp-resume") for p in parts):
            return "resume state"
        if any("run.json" in p for p in parts):
            return "run.json"
        if any("metrics.jsonl" in p or "layers.jsonl" in p for p in parts):
            return "logs"
    return "other"


def _path(value) -> str | None:
    if isinstance(value, (str, bytes, os.PathLike)):
        value = os.fsdecode(value)
        return os.path.abspath(value) if value else None
    return None


def watch_file_events(run_dir: str, kill_at: int | None = None, after: bool = False,
                      report: str | None = None) -> None:
    """Count the events by which this process changes files under ``run_dir`` and, when
    ``kill_at`` is given, SIGKILL the process at the ``kill_at``-th of its main thread
    (counted from 1): just before it happens, or (``after``) at the first Python event after
    it returned, e.g. a file opened for writing but not yet written. ``report`` (a JSON
    file) gets the events seen (``[op, kind, paths relative to run_dir, in the main
    thread]``) and the one the process was killed at (``[N, op, kind, paths, when]``);
    it is written at the kill, or at the end of the process (:func:`finish_events`)."""
    import signal
    import threading

    import safetensors.torch

    roots = {os.path.abspath(run_dir), os.path.realpath(run_dir)}
    _EVENTS.update(events=[], counted=0, killed_at=None, report=report, rmtree=None)
    busy = threading.local()

    def relative(path: str | None) -> str | None:
        for root in roots if path is not None else ():
            if path == root:
                return "."
            if path.startswith(root + os.sep):
                return path[len(root) + 1:]
        return None

    def die() -> None:
        sys.setprofile(None)
        finish_events()
        os.kill(os.getpid(), signal.SIGKILL)

    def on_event(op: str, paths: list[str]) -> None:
        # only the main thread's events are counted for placing the kill: the heartbeat
        # thread's run.json rewrites come with the clock, and would shift every later N
        main = threading.current_thread() is threading.main_thread()
        _EVENTS["events"].append([op, classify(paths), paths, main])
        _EVENTS["counted"] += main
        if main and kill_at is not None and _EVENTS["counted"] == kill_at:
            _EVENTS["killed_at"] = [kill_at, op, classify(paths), paths,
                                    "after" if after else "before"]
            if not after:
                die()
            sys.setprofile(lambda *_: die())  # the first Python event after the op returns

    def hook(event: str, args: tuple) -> None:
        if getattr(busy, "on", False) or _EVENTS.get("done"):
            return
        paths: list[str | None]
        if event == "open":
            if not isinstance(args[0], (str, bytes, os.PathLike)) or not (
                    (args[2] or 0) & _WRITE_FLAGS or (args[1] and any(c in str(args[1])
                                                                      for c in "wax+"))):
                return
            paths = [_path(args[0])]
        elif event == "os.rename":
            paths = [_path(args[0]), _path(args[1])]
        elif event in ("os.remove", "os.rmdir", "os.mkdir", "os.truncate"):
            if event != "os.truncate" and args[-1] not in (None, -1):  # dir_fd: in an rmtree
                if _EVENTS["rmtree"] is None:
                    return
                paths = [os.path.join(_EVENTS["rmtree"], os.fsdecode(args[0]))]
            else:
                paths = [_path(args[0])]
        elif event == "shutil.rmtree":
            _EVENTS["rmtree"] = _path(args[0])
            paths = [_EVENTS["rmtree"]]
        elif event == SAVE_FILE_EVENT:
            paths = [_path(args[0])]
        else:
            return
        inside = [r for r in map(relative, paths) if r is not None]
        if not inside or (event == "os.mkdir" and os.path.isdir(paths[0])):
            return  # outside the run, or a folder that exists already (changes nothing)
        busy.on = True
        try:
            on_event(event.removeprefix("spiderscope.faults."), inside)
        finally:
            busy.on = False

    original = safetensors.torch.save_file

    def save_file(tensors, filename, *args, **kwargs):
        sys.audit(SAVE_FILE_EVENT, os.fspath(filename))
        return original(tensors, filename, *args, **kwargs)

    # wherever the library's function was imported by name, the wrapper stands in for it
    safetensors.torch.save_file = save_file
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] in ("spider", "safetensors", "analysis"):
            for attribute, value in list(vars(module).items()):
                if value is original:
                    setattr(module, attribute, save_file)
    sys.addaudithook(hook)


_EVENTS: dict = {}


def finish_events() -> None:
    """Write the report of :func:`watch_file_events` (once)."""
    if not _EVENTS.get("report") or _EVENTS.get("done"):
        return
    _EVENTS["done"] = True
    with open(_EVENTS["report"], "w", encoding="utf-8") as handle:
        json.dump({"events": _EVENTS["events"], "killed_at": _EVENTS["killed_at"]}, handle)


def child(argv: list[str], log: str, faults: dict | None = None) -> int:
    """Body of a forked child: ``python -m spider.train ARGV`` with its output in ``log``,
    after injecting ``faults`` (``{"enospc_on_save_call": K}``, ``{"nan_gradient_at_step":
    K}``, ``{"sigterm_at_first_evaluation": True}``, ``{"events": {...}}``: the arguments of
    :func:`watch_file_events`)."""
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    from spider.train import main

    faults = faults or {}
    if "enospc_on_save_call" in faults:
        inject_enospc(int(faults["enospc_on_save_call"]))
    if "nan_gradient_at_step" in faults:
        inject_nan_gradient(int(faults["nan_gradient_at_step"]))
    if faults.get("sigterm_at_first_evaluation"):
        inject_sigterm_at_first_evaluation()
    if "events" in faults:
        watch_file_events(**faults["events"])
    try:
        main(argv)
        return 0
    except SystemExit as end:
        return end.code if isinstance(end.code, int) else (0 if end.code is None else 1)
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        finish_events()


def serve() -> None:
    warm()
    reply = sys.stdout
    print(json.dumps({"ready": True}), file=reply, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "start":
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    code = child(request["argv"], request["log"], request.get("faults"))
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            print(json.dumps({"pid": pid}), file=reply, flush=True)
        elif request["op"] == "poll":
            pid, status = os.waitpid(request["pid"], os.WNOHANG)
            code = os.waitstatus_to_exitcode(status) if pid else None
            print(json.dumps({"code": code}), file=reply, flush=True)
        elif request["op"] == "cpu":
            times = os.times()
            print(json.dumps({"children_cpu_s": times.children_user + times.children_system,
                              "own_cpu_s": times.user + times.system}), file=reply, flush=True)


if __name__ == "__main__":
    serve()
