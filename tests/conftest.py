import os
import sys

from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))  # tests/oracle.py is importable as `oracle`
# benchmarks/triton_aot.py (ahead-of-time compilation of the Triton kernels) as `triton_aot`
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

# Reproducible CI runs: derandomized examples, no per-example deadline (2 shared cores).
settings.register_profile(
    "tokenmix",
    deadline=None,
    max_examples=25,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "tokenmix"))


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same global RNG state, so CI runs are reproducible."""
    torch.manual_seed(0)
    yield
