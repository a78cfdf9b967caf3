"""Test set-up: run Triton kernels under the interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is first imported, so it is set
here, at collection time, before any test module imports spark_ext.kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()

# The suite runs thousands of tiny ops; on a 2-core CI machine intra-op
# threading only adds synchronisation overhead to them.
if not HAS_CUDA:
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_backend_choices():
    """Forget the ops' cached backend choices around every test: some tests patch the availability rules."""
    from spark_ext.ops import _dispatch

    _dispatch.clear_cache()
    yield
    _dispatch.clear_cache()


@pytest.fixture(autouse=True)
def _triton_on_cuda(request):
    """On a GPU machine, tests parametrised with ``backend="triton"`` build their tensors on CUDA.

    The backend tests (tests/test_*_backends.py) create inputs with factory
    functions and no device. Without a GPU they run on CPU under Triton's
    interpreter; with one, Triton does not run CPU tensors (TRITON_INTERPRET
    is unset), so the default device becomes CUDA for those tests only.
    """
    callspec = getattr(request.node, "callspec", None)
    if not HAS_CUDA or callspec is None or callspec.params.get("backend") != "triton":
        yield
        return
    torch.set_default_device("cuda")
    try:
        yield
    finally:
        torch.set_default_device(None)
