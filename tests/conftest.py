import os

import pytest
import torch

# Tests never reach the Hugging Face hub: fail fast instead of retrying a network that is not there.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from intra-op threads, and several test processes (DDP, torchrun) share two
# cores: one thread each avoids oversubscription, which makes OpenMP crawl.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: models this small run fastest on one, and OpenMP threads stall when other
    processes share the cores. Modules opt in with pytestmark = pytest.mark.usefixtures("one_thread")."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
