import json
import os

import numpy as np
import pytest

import ellm
from ellm._bundled import bundled_model_path

DATA = os.path.join(os.path.dirname(__file__), "data")
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


@pytest.fixture(scope="session")
def models(checkpoint, state_dict):
    """The bundled model on each backend."""
    return {b: build(b, checkpoint.args, state_dict) for b in BACKENDS}


def load_on(backend_name, path, **kwargs):
    """Transformer.from_pretrained(path) on the named backend, restoring the previous one."""
    previous = ellm.get_backend()
    ellm.set_backend(backend_name)
    try:
        return ellm.Transformer.from_pretrained(path, **kwargs)
    finally:
        ellm.set_backend(previous)
