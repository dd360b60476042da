"""The tests' own build of the CPU kernels: the sources of the native library's CPU backend
(``tokenmix/ops/backends/cpu/csrc``, without the autograd kernel) compiled with
``-DTOKENMIX_TEST_HOOKS``, which registers them as the ops of ``torch.ops.tokenmix_test_hooks``
(the same kernels as the shipping ``tokenmix::`` CPU kernels, called below autograd) together
with the hooks the tests need and the shipping library leaves out:

- ``lent_planes_override(n) -> previous``: correlate's lent planes (``scratch.h``:
  ``lent_planes``) forced to n >= 0 of the last planes, so the scratch-free tail kernel meets
  every geometry; -1 restores the kernel's own sizing.

Built once per source state beside the native library (about a minute, cached).
"""

from __future__ import annotations

import os

import torch

from tokenmix.ops import native

_DEFINES = ["-DTOKENMIX_TEST_HOOKS", "-fvisibility=hidden"]  # hidden: no symbol binds to the shipping library's


def load():
    """torch.ops.tokenmix_test_hooks, built on first use."""
    if not hasattr(torch.ops.tokenmix_test_hooks, "lent_planes_override"):
        cpu = os.path.join("backends", "cpu", "csrc")
        sources = [s for s in native.sources() if cpu in s]
        name = native.name().replace("tokenmix_native_", "tokenmix_test_hooks_")
        directory = os.path.join(native.cache_root(), name)
        native.build_and_load(name, sources, directory, native.CFLAGS + _DEFINES, native.LDFLAGS,
                              what="the tests' build of the CPU kernels")
    return torch.ops.tokenmix_test_hooks
