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
    """Make the ``on_call``-th safetensors file write of the run directory fail as a full
    disk does: part of the file gets out, then ``OSError(ENOSPC)``. Portable stand-in for
    a size-limited file system (which needs mount rights)."""
    import errno

    import spider.rundir

    original = spider.rundir.save_file
    calls = [0]

    def save_file(tensors, filename, *args, **kwargs):
        calls[0] += 1
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


def child(argv: list[str], log: str, faults: dict | None = None) -> int:
    """Body of a forked child: ``python -m spider.train ARGV`` with its output in ``log``,
    after injecting ``faults`` (``{"enospc_on_save_call": K}``, ``{"nan_gradient_at_step":
    K}``, ``{"sigterm_at_first_evaluation": True}``)."""
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
    try:
        main(argv)
        return 0
    except SystemExit as end:
        return end.code if isinstance(end.code, int) else (0 if end.code is None else 1)
    except BaseException:
        traceback.print_exc()
        return 1


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
