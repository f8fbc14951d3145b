"""SPIDER's CPU kernels (``_spider_native.c``): built once per machine, loaded with ctypes.

Why not torch.compile on CPUs: a compiled call costs 20-40 us of guards and wrappers, and an
update makes three per tensor, so the compiled update measured no faster than the eager one
there (bench/bench_methods.py). A plain C shared library called through ctypes costs a few
microseconds a call.

The library is compiled by the system's C compiler (``$CC``, else ``cc``) with
``-O3 -march=native -fopenmp`` (``flags()``) into ``$SPIDERSCOPE_KERNELS`` (default
``~/.cache/spiderscope/kernels``; the temporary folder where that cannot be written) under a
hash of the source, the flags, the compiler's version and the CPU's flags, so a cache shared
between machines never hands one a binary built for another; about a second, once. It links PyTorch's OpenMP runtime (the one
already loaded), so its threads are PyTorch's.

``kernels()`` returns the loaded ``NativeKernels`` or raises ``NativeUnavailable`` with the
reason (no compiler, compile error, not x86/ARM Linux...); the caller falls back to the
eager update with one warning.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("_spider_native.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-math-errno",
         "-shared", "-fPIC", "-std=c11")
#: x86: 512-bit vectors where the CPU has them (the mask pass measured 1.4x faster than with
#: the 256-bit ones -march=native prefers on AMD Zen 4)
X86_FLAGS = ("-mprefer-vector-width=512",)


def flags() -> tuple[str, ...]:
    return FLAGS + (X86_FLAGS if platform.machine() in ("x86_64", "AMD64") else ())
MODES = {"signed": 0, "abs": 1, "fisher": 2}


class NativeUnavailable(RuntimeError):
    """The CPU kernels cannot be built or loaded here."""


def kernel_dir() -> Path:
    root = os.environ.get("SPIDERSCOPE_KERNELS")
    return Path(root) if root else Path.home() / ".cache" / "spiderscope" / "kernels"


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return os.access(folder, os.W_OK)
    except OSError:
        return False


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise NativeUnavailable("no C compiler (cc, gcc or $CC) on this machine")
    return cc


def build() -> Path:
    """The path of the built library, compiling it when it is not in the cache."""
    if platform.system() != "Linux":
        raise NativeUnavailable(f"built on Linux only, this is {platform.system()}")
    cc = _compiler()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as error:
        raise NativeUnavailable(f"{cc} does not run ({error})") from error
    key = hashlib.blake2b(
        "\n".join([SOURCE.read_text(), " ".join(flags()), version, _cpu_flags(),
                   platform.machine()]).encode(), digest_size=10).hexdigest()
    name = f"spider-{key}.so"
    folder = kernel_dir()
    if (folder / name).exists():
        return folder / name
    if not _writable(folder):  # a read-only home: this machine's temporary folder instead
        folder = Path(tempfile.gettempdir()) / f"spiderscope-kernels-{os.getuid()}"
        if (folder / name).exists():
            return folder / name
    target = folder / name
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # into a temporary name, then renamed: a process that loses a race to build the same
        # file, or a build cut short, never leaves a half-written library under the real name
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
    except OSError as error:
        raise NativeUnavailable(f"cannot write to {target.parent} ({error})") from error
    try:
        done = subprocess.run([cc, *flags(), str(SOURCE), "-o", tmp, "-lm"],
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise NativeUnavailable(f"{cc} failed: {last}")
        os.replace(tmp, target)
    except (OSError, subprocess.SubprocessError) as error:
        raise NativeUnavailable(f"{cc} failed ({error})") from error
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


class NativeKernels:
    """The three passes on float32 CPU tensors (contiguous, flat). Sums come back as Python
    floats: a call's whole Python cost is a few microseconds."""

    def __init__(self, path: Path):
        lib = ctypes.CDLL(str(path))
        i64, f32, i32, vp = ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_void_p
        lib.spider_accumulate.argtypes = [vp, vp, i64, i32, i32, vp]
        lib.spider_mask.argtypes = [vp, vp, i64, f32, f32, f32, f32, i32, vp, i32, vp]
        lib.spider_merge.argtypes = [vp, vp, vp, i64, f32, i32]
        for fn in (lib.spider_accumulate, lib.spider_mask, lib.spider_merge):
            fn.restype = None
        self.lib = lib

    @staticmethod
    def accepts(*tensors: torch.Tensor) -> bool:
        """Whether the passes may read these tensors: float32, on the CPU, contiguous."""
        return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
                   for t in tensors)

    def accumulate(self, grad_sum: torch.Tensor, grad: torch.Tensor | None,
                   mode: str) -> list[float]:
        """``S += g`` (per ``mode``) in place; returns ``[sum|S|, sum S^2]``."""
        sums = (ctypes.c_double * 2)()  # per call: two threads may update two models
        self.lib.spider_accumulate(grad_sum.data_ptr(), None if grad is None else grad.data_ptr(),
                                   grad_sum.numel(), MODES[mode], torch.get_num_threads(), sums)
        return list(sums)

    def mask(self, grad_sum: torch.Tensor, theta0: torch.Tensor, coef: list[float],
             out: torch.Tensor, binary: bool) -> list[float]:
        """The raw keep-weight into ``out``, with ``G = sigmoid(coef[0] |S| + coef[1])`` and
        ``I = sigmoid(coef[2] |theta0| + coef[3])``; returns ``[sum w, count(w > 0)]``."""
        sums = (ctypes.c_double * 2)()
        self.lib.spider_mask(grad_sum.data_ptr(), theta0.data_ptr(), grad_sum.numel(), *coef,
                             int(binary), out.data_ptr(), torch.get_num_threads(), sums)
        return list(sums)

    def merge(self, param: torch.Tensor, theta0: torch.Tensor, w: torch.Tensor,
              mask_sums: list[float], normalize: bool, full_precision: bool) -> None:
        """``p <- theta0 + min(w * scale, 1) (p - theta0)``, scale from ``mask_sums``."""
        raw_sum, nonzero = mask_sums
        scale = nonzero / raw_sum if normalize and nonzero > 0 else 1.0
        self.lib.spider_merge(param.data_ptr(), theta0.data_ptr(), w.data_ptr(), param.numel(),
                              scale, torch.get_num_threads())


_LOADED: NativeKernels | NativeUnavailable | None = None


def kernels() -> NativeKernels:
    """The process's loaded kernels (built on first use); raises ``NativeUnavailable``."""
    global _LOADED
    if _LOADED is None:
        try:
            _LOADED = NativeKernels(build())
        except NativeUnavailable as error:
            _LOADED = error
        except OSError as error:  # a library that does not load (wrong architecture...)
            _LOADED = NativeUnavailable(f"the built kernels do not load ({error})")
    if isinstance(_LOADED, NativeUnavailable):
        raise _LOADED
    return _LOADED
