"""Every kernel test on the CPU runs under the bounds-checked interpreter (bounds.py): a load or
store outside the launch's tensors fails the test that made it, whatever the test asserts."""
import os

import pytest


@pytest.fixture(autouse=True)
def _kernels_stay_in_bounds(request):
    # test_bounds.py checks inside its tests (one of them makes an access out of bounds on purpose)
    if os.environ.get("TRITON_INTERPRET") != "1" or request.module.__name__.endswith("test_bounds"):
        yield
        return
    from tests.kernels.bounds import bounds_checked
    with bounds_checked() as report:
        yield
    assert not report.faults, f"out-of-bounds accesses (kernel, kind, lanes, first address): {report.faults[:5]}"
