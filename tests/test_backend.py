"""The backend switch, in fresh interpreters so the environment variable is read anew."""

import subprocess
import sys

import pytest

import ellm


def run(code, env_value=None, hide_extension=False):
    import os

    env = dict(os.environ)
    env.pop("LUMINA_USE_RUST", None)
    if env_value is not None:
        env["LUMINA_USE_RUST"] = env_value
    if hide_extension:
        code = ("import sys\nclass Hide:\n    def find_spec(self, name, path=None, target=None):\n"
                "        if name == 'ellm._lowlevel': raise ImportError('hidden by the test')\n"
                "sys.meta_path.insert(0, Hide())\n" + code)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_default_and_one_use_rust():
    for value in (None, "1"):
        r = run("import ellm; print(ellm.get_backend())", value)
        assert r.stdout.strip() == "rust", r.stderr


def test_zero_uses_numpy():
    r = run("import ellm, numpy as np; print(ellm.get_backend(), ellm.ops.silu(np.zeros(2)).tolist())", "0")
    assert r.stdout.strip() == "numpy [0.0, 0.0]", r.stderr


def test_bad_value_raises_naming_the_variable():
    r = run("import ellm; ellm.get_backend()", "yes")
    assert r.returncode != 0
    assert "ValueError" in r.stderr and "LUMINA_USE_RUST" in r.stderr and "'yes'" in r.stderr


def test_missing_extension_falls_back_with_one_warning():
    code = ("import warnings, numpy as np\nwarnings.simplefilter('always')\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    import ellm\n    ellm.ops.silu(np.zeros(2)); ellm.ops.silu(np.zeros(2))\n"
            "    print(ellm.get_backend(), ellm.rust_available(), [x.category.__name__ for x in w])\n"
            "try:\n    ellm.set_backend('rust')\nexcept ellm.BackendUnavailableError as e:\n    print('unavailable')\n")
    r = run(code, hide_extension=True)
    assert r.stdout.split("\n")[:2] == ["numpy False ['BackendWarning']", "unavailable"], r.stderr


def test_set_backend_validates():
    with pytest.raises(ValueError, match="backend"):
        ellm.set_backend("cuda")
    ellm._backend.require_rust()  # the rest needs the extension


@pytest.mark.skipif(not hasattr(__import__("os"), "fork") or not ellm.rust_available(), reason="needs fork and the Rust core")
def test_a_forked_child_computes_after_the_parent_did():
    # The threads of the parent do not exist in a child made by fork(); the child must start
    # its own instead of waiting forever for them (multiprocessing, DataLoader workers).
    code = (
        "import os, numpy as np\n"
        "from ellm import ops\n"
        "w = np.ones((1536, 64), np.float32)\n"
        "def work():\n"
        "    a = ops.linear(np.ones((1, 64), np.float32), w)\n"
        "    b = ops.linear(np.ones((300, 64), np.float32), w)\n"
        "    c = ops.optical_linear(np.full((32, 64), 0.5, np.float32), w * 0.01, precision=8, noise_level=0.1,\n"
        "                           temp_drift=0.0, attenuation=1.0, training=True, seed=1)\n"
        "    return float(a.sum() + b.sum() + c.sum() + ops.normal((100000,), seed=3).sum())\n"
        "parent = work()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os._exit(0 if work() == parent else 3)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "print(os.waitstatus_to_exitcode(status))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0"


@pytest.mark.skipif(not ellm.rust_available(), reason="needs the Rust core")
def test_calls_from_several_threads_at_once_match_calls_one_by_one():
    # The kernels release the GIL; while one call holds the team of threads, the others run
    # their parts on the pool instead, and must give the same numbers.
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from ellm import ops

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((1536, 300)) * 0.05).astype(np.float32)
    xs = [rng.random((rows, 300), dtype=np.float32) for rows in (1, 3, 32)]
    opt = dict(precision=8, noise_level=0.1, temp_drift=0.05, attenuation=0.9, training=True, seed=4)
    jobs = [(lambda x=x: ops.linear(x, w)) for x in xs] + [(lambda x=x: ops.optical_linear(x, w, **opt)) for x in xs]
    alone = [job() for job in jobs]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda i: jobs[i % len(jobs)](), range(20 * len(jobs))))
    for i, result in enumerate(together):
        np.testing.assert_array_equal(result, alone[i % len(jobs)])
