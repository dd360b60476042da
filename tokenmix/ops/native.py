"""The native library: the C++ autograd kernel of the three ``tokenmix::`` ops
(``ops/csrc/autograd.cpp``) and the CPU backend's kernels (``ops/backends/cpu/csrc/*.cpp``),
compiled once with :func:`torch.utils.cpp_extension.load` and loaded into the process.

Nothing is compiled at import: :func:`load` builds on its first call (about 30-40 s on two
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


def build_directory() -> str:
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    return os.path.join(root, name())


def _build() -> str:
    """Compile (or load the cached build of) the library; returns the path of the loaded file.
    The library registers its kernels with ``TORCH_LIBRARY`` (no pybind11), so
    ``load(is_python_module=False)`` loads it into the process and returns its path."""
    from torch.utils.cpp_extension import load

    directory, lib = build_directory(), name()
    if not os.path.isfile(os.path.join(directory, lib + ".so")):
        print("tokenmix: compiling the CPU kernels once, about 30-40 s ...", file=sys.stderr, flush=True)
    os.makedirs(directory, exist_ok=True)
    return load(name=lib, sources=sources(), extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS),
                build_directory=directory, is_python_module=False, verbose=False)


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
            except Exception as exc:  # compiler missing, ninja missing, build error...
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
