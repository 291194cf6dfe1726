"Shared pytest fixtures: a small MiniNSD made once per test session (mindlink.mininsd, nbs/01a_mininsd.ipynb)."
import os

import pytest
import torch

os.environ.setdefault('MINDLINK_NO_PROGRESS', '1')


@pytest.fixture(scope='session')
def mini_nsd_root(tmp_path_factory):
    """A SMALL MiniNSD in NSD's layout (about 2 s to make): 5 subjects (1-4 train, 5 held out),
    12 shared test images + 36 unique training images per subject, 3 repetitions,
    48 trials per session (3 sessions), volumes 20x24x20, ROI ~400-700 voxels, stimuli 32x32x3.
    Read it with `mindlink.data.NSDReader(mini_nsd_root)`. The knobs are `mindlink.mininsd.TINY_MINI_NSD`."""
    from mindlink.mininsd import TINY_MINI_NSD, make_mini_nsd
    return make_mini_nsd(tmp_path_factory.mktemp('mini_nsd'), seed=0, show_progress=False, **TINY_MINI_NSD)


@pytest.fixture(scope='session', autouse=True)
def one_thread():
    "One intra-op thread: tiny models run as fast on one, and two OpenMP threads per process thrash beside other jobs."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='session')
def tiny(tmp_path_factory):
    "A tiny random SD 1.5 + IP-Adapter Plus written in the real on-disk layout (mindlink.reconstruction)."
    from mindlink.reconstruction import build_tiny_sd_ip_adapter
    return build_tiny_sd_ip_adapter(tmp_path_factory.mktemp('tiny_weights'))


def pytest_configure(config):
    config.addinivalue_line('markers', 'cuda: needs a CUDA GPU; run by `mindlink bench gpu` (pytest -m cuda), skipped elsewhere')
