"""The native library's build under faults (tokenmix/ops/native.py), on a small stand-in
library built by the same code: processes that start together build once; a build killed at
any moment is followed by a process that builds again within a bound; a damaged library is
detected and rebuilt, never loaded; a complete cache loads without writing; a cache that holds
no build and cannot be written makes the op fall back to the reference with one warning that
says how to build elsewhere."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from tokenmix.ops import Window, aggregate
from tokenmix.ops.backends.reference import ReferenceBackend

STANDIN = r"""
#include <ATen/ATen.h>
#include <torch/library.h>
at::Tensor twice(const at::Tensor& x) { return x * 2; }
TORCH_LIBRARY(tokenmix_standin, m) { m.def("twice(Tensor x) -> Tensor", &twice); }
"""

# builds (or loads) the stand-in in argv[1]; with argv[2] == "readonly", every write into that
# directory fails as on a read-only file system (root ignores permission bits, so the test
# refuses writes with an audit hook instead)
CHILD = r"""
import os, sys
directory, source = sys.argv[1], sys.argv[2]
if len(sys.argv) > 3 and sys.argv[3] == "readonly":
    def refuse(event, args):
        if event in ("open", "os.mkdir", "os.remove", "os.rename") and str(args[0]).startswith(directory):
            flags = args[2] if event == "open" and len(args) > 2 else None
            mode = args[1] if event == "open" else None
            if event != "open" or (isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)) \
                    or (isinstance(mode, str) and any(c in mode for c in "wax+")):
                raise PermissionError(30, "Read-only file system", args[0])
    sys.addaudithook(refuse)
import torch
from tokenmix.ops import native
native.build_and_load("standin", [source], directory, ["-O0"], [], what="the stand-in")
print(torch.ops.tokenmix_standin.twice(torch.ones(2)).tolist())
"""

BOUND = 300  # seconds a process may take to finish after a fault (a build takes ~20 s)


def _child(directory, source, *extra, wait=True):
    cmd = [sys.executable, "-c", CHILD, directory, source, *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=BOUND)
    assert proc.returncode == 0, err[-3000:]
    return out, err


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Three processes started together on an empty cache: each finishes with the right
    result and exactly one compiled. Returns (source, directory of that complete build)."""
    root = tmp_path_factory.mktemp("native")
    source = str(root / "standin.cpp")
    with open(source, "w") as f:
        f.write(STANDIN)
    directory = str(root / "cache")
    procs = [_child(directory, source, wait=False) for _ in range(3)]
    outs = [p.communicate(timeout=BOUND) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert out.strip() == "[2.0, 2.0]"
    assert sum("compiling the stand-in once" in err for _, err in outs) == 1
    return source, directory


def _copy(built, tmp_path):
    source, directory = built
    copy = str(tmp_path / "cache")
    shutil.copytree(directory, copy)
    return source, copy


def test_concurrent_first_use_builds_once(built):
    source, directory = built
    assert os.path.isfile(os.path.join(directory, "standin.so.sha256"))


def test_complete_cache_loads_read_only(built, tmp_path):
    source, directory = _copy(built, tmp_path)
    before = {f: os.stat(os.path.join(directory, f)).st_mtime_ns for f in os.listdir(directory)}
    out, err = _child(directory, source, "readonly")
    assert out.strip() == "[2.0, 2.0]" and "compiling" not in err
    assert {f: os.stat(os.path.join(directory, f)).st_mtime_ns for f in os.listdir(directory)} == before


@pytest.mark.parametrize("size", [0, 600_000])
def test_damaged_library_is_rebuilt_not_loaded(built, tmp_path, size):
    source, directory = _copy(built, tmp_path)
    library = os.path.join(directory, "standin.so")
    n = min(size, os.path.getsize(library) - 1)
    os.truncate(library, n)
    out, err = _child(directory, source)
    assert out.strip() == "[2.0, 2.0]" and "compiling the stand-in once" in err


@pytest.mark.parametrize("after", [1.0, 4.0])
def test_killed_build_is_followed_by_one_that_finishes(built, tmp_path, after):
    """SIGKILL of the building process (its compiler keeps running, orphaned) after ``after``
    seconds; the next process waits for the orphan, then builds from scratch."""
    source, _ = built
    directory = str(tmp_path / "cache")
    proc = _child(directory, source, wait=False)
    time.sleep(after)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    start = time.monotonic()
    out, err = _child(directory, source)
    assert out.strip() == "[2.0, 2.0]"
    assert time.monotonic() - start < BOUND


def test_unwritable_empty_cache_falls_back_with_one_warning(tmp_path):
    """No complete build and a cache that cannot be written: no compile is tried, the op runs
    on the reference backend, and the one warning names the directory and how to build."""
    directory = str(tmp_path / "ro")
    code = CHILD.split("import torch\n")[0].replace("directory, source = sys.argv[1], sys.argv[2]",
                                                     "directory, source = sys.argv[1], None") + r"""
import warnings, torch
from tokenmix.ops import Window, aggregate
from tokenmix.ops.backends.reference import ReferenceBackend
x, w = torch.randn(1, 4, 6, 5, dtype=torch.float64), torch.randn(1, 2, 9, 6, 5, dtype=torch.float64)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    y = aggregate(x, w, Window(3)); aggregate(x, w, Window(3))
msgs = [str(c.message) for c in caught if "tokenmix" in str(c.message)]
assert len(msgs) == 1, msgs
assert torch.allclose(y, ReferenceBackend().aggregate(x, w, Window(3)))
print(msgs[0])
"""
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=directory)
    out = subprocess.run([sys.executable, "-c", code, directory, "-", "readonly"], capture_output=True, text=True,
                         env=env, timeout=BOUND)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "cannot be written" in out.stdout and "tokenmix build" in out.stdout and directory in out.stdout
    assert "compiling" not in out.stderr
