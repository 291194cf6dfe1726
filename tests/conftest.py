"Shared pytest fixtures: a small MiniNSD (mindlink.mininsd) and the full-scale rehearsal's inputs, each made once per test session."
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


@pytest.fixture(scope='session')
def fullscale(tmp_path_factory):
    """The full-scale path's inputs at their real shapes, written once per test session (see tests/test_fullscale.py):
    `root`: NSD at its published geometry (subjects 1, 2, 5, 7; one 750-trial session each at the func1pt8mm grid,
    nsdgeneral of the published size, NSD-shaped design and imgBrick; 4 shared + 8 own images shown), `sd` and
    `ip_adapter`: SD 1.5 + IP-Adapter Plus folders in the real layout (tokens 16 x 768, ViT-H width, 512 px, cut depth),
    `metric_weights`: the five metric networks in MINDLINK_WEIGHTS's layout (real architectures, random weights)."""
    from mindlink.mininsd import make_nsd_rehearsal
    from mindlink.metrics import write_random_metric_weights
    from mindlink.reconstruction import build_sd_ip_adapter
    base = tmp_path_factory.mktemp('fullscale')
    return dict(root=make_nsd_rehearsal(base / 'nsd'), **build_sd_ip_adapter(base / 'weights', 'rehearsal'),
                metric_weights=write_random_metric_weights(base / 'metric_weights'))
