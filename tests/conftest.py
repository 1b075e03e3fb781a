import json
import os
import socket
import sys
import time

import numpy as np
import pytest

if os.environ.get("ELLM_TEST_WITHOUT_RUST") == "1":  # run the suite as where the extension is not built
    class _HideExtension:
        def find_spec(self, name, path=None, target=None):
            if name == "ellm._lowlevel":
                raise ImportError("hidden: ELLM_TEST_WITHOUT_RUST=1")

    sys.meta_path.insert(0, _HideExtension())
    os.environ["LUMINA_USE_RUST"] = "0"

import ellm  # noqa: E402
from ellm.errors import BackendUnavailableError  # noqa: E402
from ellm._bundled import bundled_model_path  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "data")
NO_EXTENSION = "needs the Rust extension ellm._lowlevel, which is not built (the NumPy backend's share ran)"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Without the extension, a test (or fixture) that asks for the Rust backend is skipped,
    saying why, and everything else runs on the NumPy fallback."""
    outcome = yield
    report = outcome.get_result()
    if not ellm.rust_available() and call.excinfo is not None and call.excinfo.errisinstance(BackendUnavailableError):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: {NO_EXTENSION}")
BACKENDS = ["rust", "numpy"]


@pytest.fixture(scope="session")
def golden():
    return np.load(os.path.join(DATA, "smollm2_public_compact.npz"))


@pytest.fixture(scope="session")
def golden_cases():
    with open(os.path.join(DATA, "smollm2_public.json"), encoding="utf-8") as fh:
        return json.load(fh)


@pytest.fixture(scope="session")
def gguf_path():
    return bundled_model_path()


@pytest.fixture(scope="session")
def checkpoint(gguf_path):
    from ellm.weights import open_checkpoint

    return open_checkpoint(gguf_path)


@pytest.fixture(scope="session")
def state_dict(checkpoint):
    """The bundled model's tensors as float32, read once for the whole session."""
    return {name: checkpoint.load(name) for name in checkpoint.args.expected_shapes()}


@pytest.fixture()
def backend(request):
    """Run the test under the backend named by the parameter, restoring the previous one."""
    previous = ellm.get_backend()
    ellm.set_backend(request.param)
    yield request.param
    ellm.set_backend(previous)


def build(backend_name, args, state_dict):
    previous = ellm.get_backend()
    ellm.set_backend(backend_name)
    try:
        model = ellm.Transformer(args)
        model.load_state_dict(state_dict)
        return model
    finally:
        ellm.set_backend(previous)


class ByBackend(dict):
    """Models by backend name; asking for one whose backend is missing raises what set_backend does."""

    def __missing__(self, name):
        ellm.set_backend(name)  # BackendUnavailableError without the extension
        raise KeyError(name)


@pytest.fixture(scope="session")
def models(checkpoint, state_dict):
    """The bundled model on each backend that is available."""
    return ByBackend({b: build(b, checkpoint.args, state_dict) for b in BACKENDS
                      if b == "numpy" or ellm.rust_available()})


def load_on(backend_name, path, **kwargs):
    """Transformer.from_pretrained(path) on the named backend, restoring the previous one."""
    previous = ellm.get_backend()
    ellm.set_backend(backend_name)
    try:
        return ellm.Transformer.from_pretrained(path, **kwargs)
    finally:
        ellm.set_backend(previous)


# ----- servers started by a test -----

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url, proc=None, seconds=60):
    """Poll `url`/health until it answers 200; fail with the server's output if it dies or takes too long."""
    import httpx

    deadline = time.time() + seconds
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if (proc is not None and proc.poll() is not None) or time.time() > deadline:
            output = ""
            if proc is not None:
                proc.kill()
                output = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"the server did not come up: {output}")
        time.sleep(0.1)
