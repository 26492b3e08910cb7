import os
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


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m cuda` on a GPU machine; docs/PERFORMANCE.md)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
