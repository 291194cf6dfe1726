"""mindlink.baselines beyond its chapter: mixup inside `train_mlp` (inputs and targets mixed alike, within a subject),
the new-subject adaptation's subset against MindLink's own `prepare_data`, an adapted baseline scored by the pipeline's
`score_tokens` as MindLink's adapted models are, and the rendering of chapters 11 and 11a."""
import json, shutil
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from mindlink import baselines
from mindlink.prepare import prepare_data
from mindlink.baselines import (VoxelMLP, adapt_baseline, adapt_subset, baseline_targets, fit_baseline, train_mlp)
from mindlink.data import NSDReader
from mindlink.model import MindLinkConfig
from mindlink.utils import MindLinkError

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(hidden=32, n_blocks=1, steps=30, batch_size=8)


@pytest.fixture(scope='module')
def targets(mini_nsd_root):
    "Tokens of subjects 1-4's images and of subject 5's, all from the embedder fitted on subjects 1-4."
    return baseline_targets(mini_nsd_root, [1, 2, 3, 4], new_subjects=[5])


# ---- mixup ---------------------------------------------------------------------------------------
def onehot(n, shift):
    "n one-hot 'voxel' rows shifted by `shift`, and targets that are the same rows as one token."
    X = torch.eye(n) + shift
    return X, X.clone().view(n, 1, n)


def run(mixup, steps=6):
    "Train a two-subject network; record every (subject, input rows, target rows) a training step used."
    torch.manual_seed(0)
    net, seen, fed = VoxelMLP({1: 8, 2: 8}, n_tokens=1, token_dim=8, hidden=8, n_blocks=1), [], []
    net.register_forward_pre_hook(lambda m, a: fed.append((int(a[1]), a[0].clone())) if m.training else None)
    real = baselines.align_loss
    def spy(b, z):
        seen.append(z.detach().clone()); return real(b, z)
    with mock.patch.object(baselines, 'align_loss', spy):
        train_mlp(net, {1: onehot(8, 0.), 2: onehot(8, 10.)}, steps=steps, batch_size=4, mixup=mixup)
    return [(s, x, z.view(len(z), -1)) for (s, x), z in zip(fed, seen)], net.state_dict()


def test_mixup_zero_is_training_without_it():
    with mock.patch.object(baselines, 'mixup_batch', side_effect=AssertionError('mixup_batch called at α = 0')):
        steps0, w0 = run(0.0)
    torch.manual_seed(0)
    net = VoxelMLP({1: 8, 2: 8}, n_tokens=1, token_dim=8, hidden=8, n_blocks=1)
    train_mlp(net, {1: onehot(8, 0.), 2: onehot(8, 10.)}, steps=6, batch_size=4)     # the option not given at all
    assert all(torch.equal(w0[k], v) for k, v in net.state_dict().items())
    assert all(torch.equal(x, z) for _, x, z in steps0)                              # inputs and targets as in the data


def test_mixup_mixes_inputs_and_targets_alike_within_each_subject():
    steps, _ = run(1.0, steps=10)
    assert {s for s, _, _ in steps} == {1, 2}
    lams = []
    for s, x, z in steps:
        shift = 0. if s == 1 else 10.
        w = x - shift                                      # λ e_a + (1 - λ) e_b over this subject's own 8 rows
        assert (w > -1e-6).all(), f'subject {s}: an input row holds another subject\'s values'
        torch.testing.assert_close(w.sum(1), torch.ones(len(w)))
        assert ((w > 1e-6).sum(1) <= 2).all()                                         # at most two source rows
        torch.testing.assert_close(z - shift, w)                                      # the targets: same partner, same λ
        lams.append(w.max(1).values)
    lams = torch.cat(lams)
    assert (lams >= 0.5 - 1e-6).all() and (lams < 0.99).float().mean() > 0.5          # λ folded to ≥ 1/2, and mixing happens


def test_mixup_reaches_train_mlp_through_fit_baseline(mini_nsd_root, targets):
    calls = []
    real = baselines.mixup_batch
    def spy(*a):
        calls.append(a[3]); return real(*a)
    with mock.patch.object(baselines, 'mixup_batch', spy):
        a = fit_baseline('shared-mlp', mini_nsd_root, [1, 2], targets, mixup=0.5, **SMALL)
    assert calls == [0.5] * (2 * SMALL['steps']) and a.info['options']['mixup'] == 0.5   # one call per subject and step
    b = fit_baseline('shared-mlp', mini_nsd_root, [1, 2], targets, mixup=0.5, **SMALL)
    assert torch.equal(a.predict_test()[2], b.predict_test()[2])                        # seeded, mixup included
    c = fit_baseline('shared-mlp', mini_nsd_root, [1, 2], targets, **SMALL)
    assert not torch.equal(a.predict_test()[2], c.predict_test()[2])


# ---- a new subject -------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def own_copy(mini_nsd_root, tmp_path_factory):
    "The small MiniNSD without its cache, for prepare_data to build subject 5 alone (the shared copy's cache stays as it is)."
    return shutil.copytree(mini_nsd_root, tmp_path_factory.mktemp('nsd5') / 'nsd', ignore=shutil.ignore_patterns('mindlink_cache'))


@pytest.mark.parametrize('n,seed', [(12, 0), (20, 3), (36, 1)])
def test_adapt_subset_is_the_images_mindlinks_adaptation_trains_on(own_copy, n, seed):
    # chapter 12's adapt() trains with the config's seed set to the run's seed, on subjects=[subject], n_train=n
    data = prepare_data(MindLinkConfig.tiny(n_subjects=1).replace(seed=seed), own_copy, subjects=[5], n_train=n)
    np.testing.assert_array_equal(np.unique(data.train._ids), adapt_subset(own_copy, 5, n, seed))
    assert len(adapt_subset(own_copy, 5, n, seed)) == n


def test_an_adapted_baseline_is_scored_as_mindlinks_adapted_models_are(mini_nsd_root, targets):
    from mindlink.embeddings import RegionPCAEmbedder
    from mindlink.pipeline import score_tokens
    from mindlink.reconstruction import make_reconstructor
    reader = NSDReader(mini_nsd_root)
    from mindlink.model import MindLinkConfig
    from mindlink.prepare import prepare_data
    emb = prepare_data(MindLinkConfig.tiny(), mini_nsd_root, reader=reader).embedder      # the embedder MindLink trains on
    pre = fit_baseline('shared-mlp', reader, [1, 2, 3, 4], targets, **SMALL)
    for kind, kw in (('ridge', dict(lam=10.)), ('mlp', SMALL), ('shared-mlp', dict(pretrained=pre, **SMALL))):
        bl = adapt_baseline(kind, reader, 5, targets, 24, seed=1, **kw)
        test = reader.split([5])[5]['test']
        assert list(bl.test_ids[5]) == list(test)
        sc = score_tokens(bl.predict(5, test), test, targets, reader, make_reconstructor(emb), 5)
        assert 1 / 12 < sc.metrics['retrieval_top1'] <= 1 and 0 <= sc.metrics['two_way_identification'] <= 1
        assert np.isfinite(sc.metrics['PixCorr']) and sc.metrics['n_test'] == 12


def test_reset_tuning_without_a_pretrained_network_fits_one_on_the_other_subjects(mini_nsd_root, targets):
    bl = adapt_baseline('shared-mlp', mini_nsd_root, 5, targets, 12, seed=2, **SMALL)
    assert bl.info['adapted']['pretrained_subjects'] == [1, 2, 3, 4] and bl.subjects == [5]
    pre = fit_baseline('shared-mlp', mini_nsd_root, [1, 2, 3, 4], targets, seed=2, **SMALL)
    same = adapt_baseline('shared-mlp', mini_nsd_root, 5, targets, 12, seed=2, pretrained=pre, **SMALL)
    assert torch.equal(bl.predict_test()[5], same.predict_test()[5])              # the same pretraining, the same tuning
    two = adapt_baseline('shared-mlp', mini_nsd_root, 5, targets, 12, seed=2, train_subjects=[1, 2], **SMALL)
    assert two.info['adapted']['pretrained_subjects'] == [1, 2]
    with pytest.raises(MindLinkError, match="unknown option"): adapt_baseline('shared-mlp', mini_nsd_root, 5, targets, 12, lam=1.)


# ---- the chapters render as they read --------------------------------------------------------------
@pytest.mark.parametrize('chapter', ['11_metrics', '11a_baselines'])
def test_markdown_has_one_title(chapter):
    "A line starting with '# ' inside a markdown cell is a second H1: a giant heading and a broken table of contents."
    nb = json.loads((ROOT / 'nbs' / f'{chapter}.ipynb').read_text())
    stray = []
    for k, cell in enumerate(c for c in nb['cells'] if c['cell_type'] == 'markdown'):
        fence = False
        for j, line in enumerate(''.join(cell['source']).splitlines()):
            fence ^= line.startswith('```')
            if not fence and line.startswith('# ') and (k, j) != (0, 0): stray.append(f'{cell.get("id")}: {line[:60]}')
    assert not stray, f'{chapter}: headings of level 1 after the title:\n' + '\n'.join(stray)


def test_short_budgets_train_and_too_short_ones_are_refused():
    torch.manual_seed(0)
    net = VoxelMLP({1: 8}, n_tokens=1, token_dim=8, hidden=8, n_blocks=1)
    train_mlp(net, {1: onehot(8, 0.)}, steps=10, batch_size=4)      # a one-step warm-up used to divide by zero in the schedule
    with pytest.raises(MindLinkError, match='steps=2: expected at least 3'): train_mlp(net, {1: onehot(8, 0.)}, steps=2)
