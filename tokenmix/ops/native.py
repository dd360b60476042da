"""The native library: the C++ autograd kernel of the three ``tokenmix::`` ops
(``ops/csrc/autograd.cpp``) and the CPU backend's kernels (``ops/backends/cpu/csrc/*.cpp``),
compiled once with :func:`torch.utils.cpp_extension.load` and loaded into the process.

Nothing is compiled at import: :func:`load` builds on its first call (about a minute on two
cores, announced by one line on stderr) or loads the cached build. The build directory is
``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``) / ``tokenmix_native_<tag>``,
where the tag hashes the sources, the flags, the torch version and this CPU's model and
instruction-set flags: the kernels are built with ``-march=native``, so a cache shared by
machines with different CPUs never hands one a library with instructions it lacks, and an
edited source gets a directory of its own.

When the build fails (no compiler, no ninja), :func:`error` returns the reason: the CPU
backend then reports itself unavailable and the public functions run the reference
composition instead (see :mod:`tokenmix.ops.functional`).
"""

from __future__ import annotations

import glob
import hashlib
import os
import platform
import sys
import threading
import time
from typing import List, Optional

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno"]
LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
_state = {"loaded": False, "error": None, "seconds": None, "library": None}


def sources() -> List[str]:
    """The C++ sources of the library: the autograd kernel, then the CPU kernels."""
    cpu = os.path.join(_HERE, "backends", "cpu", "csrc")
    return sorted(glob.glob(os.path.join(_HERE, "csrc", "*.cpp"))) + sorted(glob.glob(os.path.join(cpu, "*.cpp")))


def _headers() -> List[str]:
    cpu = os.path.join(_HERE, "backends", "cpu", "csrc")
    return sorted(glob.glob(os.path.join(_HERE, "csrc", "*.h")) + glob.glob(os.path.join(cpu, "*.h")))


def _host() -> str:
    """This CPU's architecture, model and instruction-set flags."""
    info = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features"))]
        info += "".join(sorted(set(lines)))
    except OSError:
        info += platform.processor()
    return info


def name() -> str:
    """``tokenmix_native_<tag>``: the tag hashes the sources, headers, flags, torch version and host."""
    h = hashlib.sha1()
    for path in sources() + _headers():
        with open(path, "rb") as f:
            h.update(os.path.basename(path).encode() + f.read())
    h.update(" ".join(CFLAGS + LDFLAGS).encode() + torch.__version__.encode() + _host().encode())
    return f"tokenmix_native_{h.hexdigest()[:12]}"


def cache_root() -> str:
    """``$TORCH_EXTENSIONS_DIR``, or torch's default extension directory."""
    from torch.utils.cpp_extension import get_default_build_root

    return os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()


def build_directory() -> str:
    return os.path.join(cache_root(), name())


class CacheNotWritable(RuntimeError):
    """The build directory holds no complete build and cannot be written."""


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _complete(library: str) -> bool:
    """Whether ``library`` is a finished build: its marker ``<library>.sha256``, written only
    after the build succeeded, holds the library's checksum (a truncated or overwritten file,
    which could crash the process when loaded, fails this)."""
    try:
        with open(library + ".sha256") as f:
            return f.read().strip() == _sha256(library)
    except OSError:
        return False


class _BuildLock:
    """An exclusive advisory lock (``fcntl.flock``) on ``<directory>/build.lock``. The kernel
    releases it when its holder dies, so a build that was killed leaves no stale lock; a holder
    that is alive but takes longer than ``timeout`` seconds is not waited for (TimeoutError).
    Opening the lock file raises :class:`CacheNotWritable` where the directory cannot be written."""

    def __init__(self, directory: str, timeout: float):
        try:
            os.makedirs(directory, exist_ok=True)
            self.fd = os.open(os.path.join(directory, "build.lock"), os.O_RDWR | os.O_CREAT, 0o644)
            # inherited by the compiler processes: a build whose Python process was killed keeps
            # the lock until the compilers it started have exited too
            os.set_inheritable(self.fd, True)
        except OSError as e:
            raise CacheNotWritable(f"the extension cache {directory} holds no complete build and cannot be "
                                   f"written ({e.strerror})") from e
        self.directory, self.timeout = directory, timeout

    def __enter__(self):
        import fcntl

        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(self.fd)
                    raise TimeoutError(f"another process has been building in {self.directory} "
                                       f"for more than {self.timeout:.0f} s") from None
                time.sleep(0.5)

    def __exit__(self, *exc):
        os.close(self.fd)  # closing the descriptor releases the lock


def build_and_load(lib: str, srcs: List[str], directory: str, cflags: List[str], ldflags: List[str],
                   what: str = "the CPU kernels", timeout: float = 1200.0) -> str:
    """Load the library ``lib`` from ``directory``, building it from ``srcs`` first unless the
    directory holds a complete build (see :func:`_complete`); returns the library's path. A
    build announces itself with one line on stderr naming ``what`` it compiles.

    - A complete build is loaded without writing anything, so a read-only cache works.
    - Builds are serialised across processes by :class:`_BuildLock`: processes that start
      together build once, the others load that build; one killed while building leaves a
      state the next process builds from: with the lock held, everything an unfinished build
      left is deleted (torch's own lock file too, which would make every later build wait
      forever) and the library is built from scratch.
    - :class:`CacheNotWritable` when there is no complete build and the directory cannot be
      written; TimeoutError when another live process holds the lock longer than ``timeout``.
    """
    from torch.utils.cpp_extension import load as torch_load

    library = os.path.join(directory, lib + ".so")
    if not _complete(library):
        with _BuildLock(directory, timeout):
            if not _complete(library):
                for entry in os.listdir(directory):  # whatever an unfinished build left, torch's lock included
                    path = os.path.join(directory, entry)
                    if entry != "build.lock" and os.path.isfile(path):
                        os.remove(path)
                print(f"tokenmix: compiling {what} once, about a minute ({directory}) ...", file=sys.stderr,
                      flush=True)
                torch_load(name=lib, sources=srcs, extra_cflags=list(cflags), extra_ldflags=list(ldflags),
                           build_directory=directory, is_python_module=False, verbose=False)
                marker = library + ".sha256"
                with open(marker + ".tmp", "w") as f:
                    f.write(_sha256(library))
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(marker + ".tmp", marker)
                return library  # torch's load has loaded it
    torch.ops.load_library(library)
    return library


def _build() -> str:
    """Build (or load the cached build of) this package's library; returns its path. The
    library registers its kernels with ``TORCH_LIBRARY_IMPL`` (no pybind11), so loading it into
    the process is all there is to do."""
    lib = name()  # hashes every source: once
    return build_and_load(lib, sources(), os.path.join(cache_root(), lib), CFLAGS, LDFLAGS)


def load() -> bool:
    """Load the library, building it on the first call; False if that failed (the reason is
    :func:`error`). Thread-safe; the outcome is cached for the process."""
    if _state["loaded"] or _state["error"] is not None:
        return _state["loaded"]
    with _lock:
        if not _state["loaded"] and _state["error"] is None:
            start = time.perf_counter()
            try:
                _state["library"] = _build()
                _state["loaded"] = True
            except CacheNotWritable as exc:
                _state["error"] = (f"{exc}; build once where it can be written (`tokenmix build` with "
                                   f"TORCH_EXTENSIONS_DIR set to a writable directory) and point "
                                   f"TORCH_EXTENSIONS_DIR there")
            except Exception as exc:  # compiler missing, ninja missing, build error, timeout...
                lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
                errors = [ln for ln in lines if "error" in ln.lower()]
                detail = (errors or lines or [""])[0][:300]
                _state["error"] = f"could not build the C++ kernels ({type(exc).__name__}: {detail})"
            _state["seconds"] = time.perf_counter() - start
    return _state["loaded"]


def error() -> Optional[str]:
    """Why the library is not loaded (after :func:`load` failed), else None."""
    return _state["error"]


def build_info() -> dict:
    """Where the loaded library lives and how long the first load (compile or cache hit) took."""
    load()
    return {"library": _state["library"], "error": _state["error"], "load_seconds": _state["seconds"]}
