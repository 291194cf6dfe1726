"""mindlink.metrics against independent references, random-network end-to-end runs, weight loading,
and (when MINDLINK_WEIGHTS points at the real files) the pretrained networks."""
import os, warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.spatial.distance
import skimage
import skimage.data
import torch
from skimage.color import rgb2gray
from skimage.metrics import structural_similarity
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from mindlink.metrics import _lin, _resize_matrices
from mindlink.bench import bench_metrics
from mindlink.metrics import (METRICS, NETS, MetricNet, alexnet_metric, clip_metric, effnet_metric,
                              evaluate_images, find_weights, inception_metric, load_metric_net, mean_corr_distance,
                              pixcorr, plot_tsne, results_table, retrieval_top1, ssim, subject_probe_accuracy,
                              swav_metric, two_way_identification)
from mindlink.utils import MindLinkError

PHOTOS = ['astronaut', 'cat', 'coffee', 'coins', 'rocket', 'camera', 'moon', 'immunohistochemistry']


def photos(size=64, names=PHOTOS):
    "Real photos from skimage.data, square-cropped, (N, 3, size, size) float in [0, 1]."
    out = []
    for n in names:
        im = skimage.img_as_float(getattr(skimage.data, n)())
        if im.ndim == 2: im = np.stack([im] * 3, -1)
        h, w = im.shape[:2]; c = min(h, w)
        im = np.ascontiguousarray(im[(h - c) // 2:(h - c) // 2 + c, (w - c) // 2:(w - c) // 2 + c, :3])
        x = torch.from_numpy(im).permute(2, 0, 1)[None].float()
        out.append(TF.resize(x, [size], interpolation=InterpolationMode.BILINEAR, antialias=True).clamp(0, 1))
    return torch.cat(out)


def degrade(x, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (TF.gaussian_blur(x, 9, 3.0) + 0.08 * torch.randn(x.shape, generator=g)).clamp(0, 1)


def resize425(x):
    "The reference resize: torchvision's, in float64 (so that the references carry no float32 rounding)."
    return TF.resize(x.double(), [425], interpolation=InterpolationMode.BILINEAR, antialias=True)


# ---- independent references -------------------------------------------------------------------
def sk_ssim(p, t):
    gray = lambda z: rgb2gray(z.permute(0, 2, 3, 1).numpy().astype(np.float64))
    return np.mean([structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)
                    for a, b in zip(gray(p), gray(t))])


def np_pixcorr(p, t):
    return np.mean([np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(p.double().numpy(), t.double().numpy())])


def brute_two_way(pf, tf):
    pf = np.asarray(pf, np.float64).reshape(len(pf), -1); tf = np.asarray(tf, np.float64).reshape(len(tf), -1)
    N = len(pf); out = []
    for j in range(N):
        own = np.corrcoef(tf[j], pf[j])[0, 1]
        out.append(sum(np.corrcoef(tf[i], pf[j])[0, 1] < own for i in range(N) if i != j) / (N - 1))
    return np.array(out)


# ---- low level ---------------------------------------------------------------------------------
def image_pair(kind, seed, shape):
    "(reconstruction, stimulus): two independent random batches of `shape`, or photos and a degraded copy."
    if kind == 'photos':
        t = photos(); return degrade(t), t
    g = torch.Generator().manual_seed(seed)
    t, p = torch.rand(*shape, generator=g), torch.rand(*shape, generator=g)
    return p, t


@pytest.mark.parametrize('kind', ['random', 'photos'])
def test_ssim_equals_skimage(kind):
    p, t = image_pair(kind, seed=1, shape=(4, 3, 37, 29))
    assert ssim(p, t, size=None, batch_size=3, dtype=torch.float64) == pytest.approx(sk_ssim(p, t), abs=1e-10)
    assert ssim(p, t, size=None, batch_size=3) == pytest.approx(sk_ssim(p, t), abs=1e-6)   # float32, the default


def test_ssim_pixcorr_at_425_equal_references():
    t = photos(48)[:3]; p = degrade(t)
    assert ssim(p, t, dtype=torch.float64) == pytest.approx(sk_ssim(resize425(p), resize425(t)), abs=1e-10)
    assert ssim(p, t) == pytest.approx(sk_ssim(resize425(p), resize425(t)), abs=1e-6)
    assert pixcorr(p, t) == pytest.approx(np_pixcorr(resize425(p), resize425(t)), abs=1e-10)


@pytest.mark.parametrize('shape', [(2, 3, 64, 64), (2, 3, 23, 31), (2, 3, 600, 500), (2, 3, 300, 300)])
def test_resize_matrices_equal_torchvision(shape):
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    R_h, R_w = _resize_matrices(*shape[-2:], 425)
    np.testing.assert_allclose(_lin(R_h, x, R_w).numpy(), resize425(x).numpy(), atol=1e-12)


def test_low_level_metrics_on_larger_and_mixed_sizes():
    # 300 px: PixCorr resizes (float32, as given) and correlates; 64 against 425 px: each image is resized on its own
    r32 = lambda x: TF.resize(x, [425], interpolation=InterpolationMode.BILINEAR, antialias=True)
    t = photos(300)[:3]; p = degrade(t)
    assert pixcorr(p, t) == pytest.approx(np_pixcorr(r32(p), r32(t)), abs=1e-10)
    assert ssim(p, t, dtype=torch.float64) == pytest.approx(sk_ssim(resize425(p), resize425(t)), abs=1e-10)
    small, big = degrade(photos(64)[:3]), r32(photos(64)[:3])
    assert pixcorr(small, big) == pytest.approx(np_pixcorr(r32(small), big), abs=1e-10)
    assert ssim(small, big, dtype=torch.float64) == pytest.approx(sk_ssim(resize425(small), big), abs=1e-10)


def test_float32_ssim_stays_close_to_skimage_on_photos():
    # float32 is the default; the worst pairs are flat images against a photo with large flat regions
    t = photos(64, PHOTOS + ['horse', 'text', 'checkerboard', 'logo']).clamp(0, 1)
    blocks = 0.4 + 0.2 * torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(t, 16), scale_factor=16, mode='nearest')
    for p, tol in [(degrade(t), 1e-6), (t[torch.roll(torch.arange(len(t)), 1)], 1e-6), (blocks.roll(1, 0), 1e-5)]:
        ours = np.array([ssim(p[i:i + 1], t[i:i + 1]) for i in range(len(t))])
        ref = np.array([sk_ssim(resize425(p[i:i + 1]), resize425(t[i:i + 1])) for i in range(len(t))])
        assert np.abs(ours - ref).max() < tol


@pytest.mark.parametrize('kind', ['random', 'photos'])
def test_pixcorr_equals_numpy_pearson(kind):
    p, t = image_pair(kind, seed=2, shape=(5, 3, 16, 16))
    assert pixcorr(p, t, size=None, batch_size=2) == pytest.approx(np_pixcorr(p, t), abs=1e-10)


def test_identical_inputs_score_perfectly():
    t = photos(32)
    assert pixcorr(t, t) == pytest.approx(1.0, abs=1e-12)
    assert ssim(t, t) == 1.0
    assert two_way_identification(t, t) == 1.0
    assert mean_corr_distance(t, t) == pytest.approx(0.0, abs=1e-12)


def test_degraded_photos_rank_between_identical_and_shuffled():
    t = photos(); p = degrade(t); shuf = t[torch.roll(torch.arange(len(t)), 1)]
    assert pixcorr(shuf, t, size=None) < pixcorr(p, t, size=None) < 1
    assert ssim(shuf, t, size=None) < ssim(p, t, size=None) < 1


# ---- two-way identification and distances -----------------------------------------------------
@pytest.mark.parametrize('N,D,noise', [(2, 5, 1.0), (17, 3, 2.0), (50, 40, 1.0)])
def test_two_way_equals_brute_force(N, D, noise):
    g = torch.Generator().manual_seed(N)
    tf = torch.randn(N, D, generator=g); pf = tf + noise * torch.randn(N, D, generator=g)
    np.testing.assert_allclose(two_way_identification(pf, tf, reduce=False), brute_two_way(pf, tf), atol=1e-12)
    assert two_way_identification(pf, tf) == pytest.approx(brute_two_way(pf, tf).mean(), abs=1e-12)


def test_two_way_on_photo_pixels_equals_brute_force():
    t = photos(); p = degrade(t)
    assert two_way_identification(p, t) == pytest.approx(brute_two_way(p, t).mean(), abs=1e-12)


def test_two_way_shuffled_is_chance():
    g = torch.Generator().manual_seed(3)
    f = torch.randn(3000, 32, generator=g)
    assert two_way_identification(f[torch.randperm(3000, generator=g)], f) == pytest.approx(0.5, abs=0.02)


def test_two_way_is_not_symmetric_in_its_arguments_by_accident():
    # scores are per reconstruction j (column), as MindEye's np.corrcoef(gt, pred) quadrant
    g = torch.Generator().manual_seed(4)
    tf = torch.randn(30, 6, generator=g); pf = tf + torch.randn(30, 6, generator=g)
    np.testing.assert_allclose(two_way_identification(pf, tf, reduce=False), brute_two_way(pf, tf), atol=1e-12)
    assert not np.allclose(two_way_identification(pf, tf, reduce=False), two_way_identification(tf, pf, reduce=False))


def test_mean_corr_distance_equals_scipy():
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(20, 33, generator=g).double(), torch.randn(20, 33, generator=g).double()
    ref = np.mean([scipy.spatial.distance.correlation(x, y) for x, y in zip(a.numpy(), b.numpy())])
    assert mean_corr_distance(a, b) == pytest.approx(ref, abs=1e-12)


# ---- bad input ---------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    x = torch.rand(3, 3, 16, 16)
    with pytest.raises(MindLinkError, match='same number'): pixcorr(x, x[:2])
    with pytest.raises(MindLinkError, match=r'\[0, 1\]'): ssim(x * 255, x)
    with pytest.raises(MindLinkError, match='uint8'): ssim((x * 255).byte(), x)
    with pytest.raises(MindLinkError, match=r'\(N, 3, H, W\)'): pixcorr(x[:, 0], x[:, 0])
    bad = x.clone(); bad[0, 0, 0, 0] = float('nan')
    with pytest.raises(MindLinkError, match='NaN'): pixcorr(bad, x)
    with pytest.raises(MindLinkError, match='at least 11'): ssim(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8), size=None)
    for f in (pixcorr, ssim):
        with pytest.raises(MindLinkError, match='differ in shape after resizing'): f(torch.rand(2, 3, 20, 30), torch.rand(2, 3, 20, 20))
    with pytest.raises(MindLinkError, match='same shape'): two_way_identification(torch.randn(4, 3), torch.randn(4, 5))
    with pytest.raises(MindLinkError, match='unknown metrics'): evaluate_images(x, x, metrics=['FID'])
    with pytest.raises(MindLinkError, match='unknown metric network'): load_metric_net('vgg16')


# ---- retrieval ---------------------------------------------------------------------------------
def loop_retrieval(b, z, pool, n_pools, seed):
    b = b.reshape(len(b), -1).double().numpy(); z = z.reshape(len(z), -1).double().numpy()
    rng = np.random.default_rng(seed); N = len(b)
    pools = rng.permuted(np.tile(np.arange(N), (n_pools, 1)), axis=1)[:, :pool]
    cos = lambda u, v: u @ v / np.linalg.norm(u) / np.linalg.norm(v)
    f = i2b = 0
    for P in pools:
        for i in P:
            f += max(P, key=lambda k: cos(b[i], z[k])) == i
            i2b += max(P, key=lambda k: cos(b[k], z[i])) == i
    return f / pools.size, i2b / pools.size


def test_retrieval_equals_loop_and_chance():
    g = torch.Generator().manual_seed(6)
    z = torch.randn(90, 2, 8, generator=g); b = z + 1.3 * torch.randn(90, 2, 8, generator=g)
    r = retrieval_top1(b, z, pool=30, n_pools=4, seed=3)
    assert (r['brain_to_image'], r['image_to_brain']) == pytest.approx(loop_retrieval(b, z, 30, 4, 3), abs=1e-12)
    assert r['chance'] == pytest.approx(1 / 30)
    full = retrieval_top1(z, z, pool=300)          # pool >= N: one pool of all N
    assert full['pool'] == 90 and full['brain_to_image'] == full['image_to_brain'] == 1.0
    rnd = retrieval_top1(torch.randn(982, 16, generator=g), torch.randn(982, 16, generator=g), pool=300)
    assert rnd['brain_to_image'] == pytest.approx(1 / 300, abs=0.004)
    # seeded: the same pools every time
    assert retrieval_top1(b, z, pool=30, seed=3) == retrieval_top1(b, z, pool=30, seed=3)
    with pytest.raises(MindLinkError, match='pool'): retrieval_top1(b, z, pool=1)


# ---- degenerate input: undefined correlations score at chance, ties count by their expectation ----
def pearson_or_zero(a, b):
    "Pearson r of two vectors, 0 when either is constant (the policy of chapter 11)."
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return 0.0 if np.ptp(a) == 0 or np.ptp(b) == 0 else np.corrcoef(a, b)[0, 1]


def scored(f, *args, **kw):
    "(f(*args, **kw), the messages of the warnings it gave): the value is checked first, then what it said."
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        out = f(*args, **kw)
    return out, ' | '.join(str(m.message) for m in w)


def brute_two_way_ties(pf, tf):
    "Two-way identification with r = 0 for constant features and ties counted 1/2, one pair at a time."
    pf = np.asarray(pf, np.float64).reshape(len(pf), -1); tf = np.asarray(tf, np.float64).reshape(len(tf), -1)
    N = len(pf); out = []
    for j in range(N):
        own = pearson_or_zero(tf[j], pf[j])
        r = [pearson_or_zero(tf[i], pf[j]) for i in range(N) if i != j]
        out.append((sum(x < own for x in r) + 0.5 * sum(x == own for x in r)) / (N - 1))
    return np.array(out)


@pytest.mark.parametrize('px,size', [(64, None), (64, 425), (300, 425)])   # as given; small-image path; resize, then correlate
def test_pixcorr_of_a_constant_image_counts_as_zero(px, size):
    t = photos(px)[:4]; p = degrade(t)
    p[1] = 0.3                                   # a flat grey reconstruction: r is 0/0
    t2 = t.clone(); t2[2] = 0.0                  # a black stimulus
    # the reference: numpy's r pair by pair on the resized images, 0 for the flat pair
    ref = lambda a, b: np.mean([0. if i == 1 else pearson_or_zero(x, y) for i, (x, y) in enumerate(zip(a.double().numpy(), b.double().numpy()))])
    rs = {(64, None): lambda x: x, (64, 425): resize425,
          (300, 425): lambda x: TF.resize(x, [425], interpolation=InterpolationMode.BILINEAR, antialias=True)}[(px, size)]
    got, said = scored(pixcorr, p, t, size=size)
    assert np.isfinite(got) and got == pytest.approx(ref(rs(p), rs(t)), abs=1e-9)
    assert 'pred [1]' in said and '1 of 4' in said
    got, said = scored(pixcorr, t, t2, size=size)
    assert got == pytest.approx(3 / 4, abs=1e-9) and 'true [2]' in said   # three identical pairs, one undefined


def test_ssim_of_a_constant_image_is_defined_and_equals_skimage():
    # SSIM needs no policy: C1 and C2 keep it defined on flat images (a guard, not a fix)
    t = photos(48)[:3]; p = degrade(t); p[0] = 0.3; p[1] = 0.0
    assert ssim(p, t, dtype=torch.float64) == pytest.approx(sk_ssim(resize425(p), resize425(t)), abs=1e-10)
    assert ssim(p, t, size=None, dtype=torch.float64) == pytest.approx(sk_ssim(p, t), abs=1e-10)


def test_two_way_of_constant_features_is_exactly_chance():
    g = torch.Generator().manual_seed(8)
    tf = torch.randn(12, 20, generator=g)
    got, said = scored(two_way_identification, torch.ones(12, 20), tf)
    assert got == 0.5 and 'constant' in said                                  # a blank decoder: chance, not 0
    assert scored(two_way_identification, torch.zeros(12, 20), torch.zeros(12, 20))[0] == 0.5
    v = torch.randn(1, 20, generator=g)
    assert two_way_identification(v.expand(12, 20), v.expand(12, 20)) == 0.5   # every image and reconstruction identical: all ties
    pf = tf + torch.randn(12, 20, generator=g); pf[3] = 0.7; tf[5] = -1.0     # one constant reconstruction, one constant stimulus
    got, said = scored(two_way_identification, pf, tf, reduce=False)
    np.testing.assert_allclose(got, brute_two_way_ties(pf, tf), atol=1e-12)
    assert got[3] == 0.5 and 'pred_feats [3]' in said and 'true_feats [5]' in said


def test_mean_corr_distance_of_constant_features_is_one():
    g = torch.Generator().manual_seed(9)
    a, b = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    a[2] = 4.0
    ref = np.mean([1 - pearson_or_zero(x, y) for x, y in zip(a.numpy(), b.numpy())])
    got, said = scored(mean_corr_distance, a, b)
    assert got == pytest.approx(ref, abs=1e-12) and 'pred_feats [2]' in said


def test_retrieval_ties_count_by_their_expectation():
    g = torch.Generator().manual_seed(10)
    z = torch.randn(6, 8, generator=g); b = z + 0.01 * torch.randn(6, 8, generator=g)
    b[0] = 0                                     # a zero prediction ties with every candidate: 1/6, not 1 (it sits first)
    r, said = scored(retrieval_top1, b, z, pool=6)
    assert "pred [0]" in said
    assert r['brain_to_image'] == pytest.approx((1 / 6 + 5) / 6, abs=1e-12)
    a, c = torch.randn(2, 8, generator=g)
    r = retrieval_top1(torch.stack([a, c, c]), torch.stack([a, a, c]), pool=3)   # two stimuli with one embedding
    assert r['brain_to_image'] == pytest.approx((1 / 2 + 0 + 1) / 3, abs=1e-12)
    same = retrieval_top1(torch.randn(1, 8, generator=g).expand(50, 8), torch.randn(50, 8, generator=g), pool=10, n_pools=7)
    assert same['brain_to_image'] == pytest.approx(same['chance']) and same['image_to_brain'] == pytest.approx(same['chance'])


def test_retrieval_of_one_sample_is_refused():
    with pytest.raises(MindLinkError, match='at least 2'): retrieval_top1(torch.randn(1, 4), torch.randn(1, 4))   # was 1.0 "of 1"
    t = photos(32)[:1]
    assert pixcorr(t, t) == pytest.approx(1.0, abs=1e-12) and ssim(t, t) == 1.0   # a single pair is fine for the pixel metrics


def test_non_finite_values_name_their_row():
    x = torch.rand(4, 3, 8, 8); bad = x.clone(); bad[2, 1, 3, 3] = float('inf')
    with pytest.raises(MindLinkError, match=r'pred: image 2 .*NaN or inf'): pixcorr(bad, x, size=None)
    f = torch.randn(5, 7); f[3, 0] = float('nan')
    with pytest.raises(MindLinkError, match=r'true_feats: row 3 .*NaN or inf'): two_way_identification(torch.randn(5, 7), f)
    with pytest.raises(MindLinkError, match=r'true: row 3 .*NaN or inf'): retrieval_top1(torch.randn(5, 7), f)


# ---- subject invariance ------------------------------------------------------------------------
def test_subject_probe_and_tsne(tmp_path):
    g = torch.Generator().manual_seed(7)
    S, n, d = 3, 60, 16
    code = torch.randn(n, d, generator=g)
    subj = np.repeat(np.arange(1, S + 1), n); img = np.tile(np.arange(n), S)
    leaky = code.repeat(S, 1) + 2 * torch.randn(S, d, generator=g)[subj - 1] + 0.3 * torch.randn(S * n, d, generator=g)
    inv = code.repeat(S, 1) + 0.3 * torch.randn(S * n, d, generator=g)
    pl, pi = subject_probe_accuracy(leaky, subj, groups=img), subject_probe_accuracy(inv, subj, groups=img)
    assert pl['accuracy'] > 0.95 and pl['chance'] == pytest.approx(1 / 3)
    assert abs(pi['accuracy'] - 1 / 3) < 0.15
    with pytest.raises(MindLinkError, match='one label per embedding'): subject_probe_accuracy(inv, subj[:5])
    with pytest.raises(MindLinkError, match='at least 2 subjects'): subject_probe_accuracy(inv, np.ones(len(inv)))
    fig = plot_tsne(leaky, subj, path=tmp_path / 'tsne.png', title='t')
    assert (tmp_path / 'tsne.png').stat().st_size > 0 and len(fig.axes[0].collections) == S


# ---- results table -----------------------------------------------------------------------------
def test_results_table_layout_and_csv(tmp_path):
    rows = [{'group': 'per-subject', 'method': 'A', 'subject': 1, 'PixCorr': 0.2, 'AlexNet(2)': 0.9, 'EffNet-B': 0.7, 'SwAV': 0.4},
            {'group': 'per-subject', 'method': 'B', 'subject': 1, 'PixCorr': 0.3, 'AlexNet(2)': 0.8, 'EffNet-B': 0.6, 'SwAV': 0.5},
            {'group': 'single model', 'method': 'MindLink', 'PixCorr': 0.1, 'CLIP': 0.93, 'errors': {}}]
    tab = results_table(rows, path=tmp_path / 't1')
    md = tab.markdown
    head = md.splitlines()[0]
    assert head.index('PixCorr') < head.index('AlexNet(2)') < head.index('CLIP') < head.index('EffNet-B') < head.index('SwAV')
    assert 'SSIM' not in head and md.splitlines()[-1] == 'Not computed for any row: SSIM, AlexNet(5), Inception.'   # no column of dashes
    assert 'EffNet-B ↓' in head and 'CLIP ↑' in head
    assert '**0.300**' in md and '**90.0%**' in md and '**0.600**' in md and '**0.400**' in md   # best per column, ↓ for distances
    assert '**per-subject**' in md and '93.0%' in md and '–' in md
    back = __import__('pandas').read_csv(tmp_path / 't1.csv')
    assert list(back.columns[-8:]) == list(METRICS) and back['PixCorr'].tolist() == [0.2, 0.3, 0.1]
    assert (tmp_path / 't1.md').read_text().strip() == md
    with pytest.raises(MindLinkError, match='method'): results_table([{'PixCorr': 1.0}])


# ---- networks: weights, loading, end to end ----------------------------------------------------
def tiny_clip(d):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                                   patch_size=8, image_size=32, projection_dim=16)).save_pretrained(d)
    return Path(d)


def test_network_metrics_end_to_end_random_init(tmp_path):
    t = photos(32)[:3]; p = degrade(t)
    alex, eff, swav = load_metric_net('alexnet'), load_metric_net('effnet'), load_metric_net('swav')   # weights=None: random init
    m = alexnet_metric(p, t, weights=alex)
    assert set(m) == {'AlexNet(2)', 'AlexNet(5)'} and all(0 <= v <= 1 for v in m.values())
    assert alexnet_metric(t, t, weights=alex) == {'AlexNet(2)': 1.0, 'AlexNet(5)': 1.0}
    assert inception_metric(t[:2], t[:2]) == 1.0
    assert effnet_metric(t, t, weights=eff) == pytest.approx(0.0, abs=1e-5) and 0 <= effnet_metric(p, t, weights=eff) <= 2
    assert swav_metric(t, t, weights=swav) == pytest.approx(0.0, abs=1e-5) and 0 <= swav_metric(p, t, weights=swav) <= 2
    clip_dir = tiny_clip(tmp_path / 'clip')
    assert clip_metric(t, t, weights=clip_dir) == 1.0 and 0 <= clip_metric(p, t, weights=clip_dir) <= 1


def test_missing_weights_name_the_file_and_other_metrics_still_run(tmp_path):
    t = photos(32)[:3]
    tiny_clip(tmp_path / 'clip-vit-large-patch14')          # only CLIP is present in the folder
    res = evaluate_images(degrade(t), t, weights=tmp_path, metrics=('PixCorr', 'SSIM', 'AlexNet(2)', 'AlexNet(5)', 'CLIP', 'EffNet-B', 'SwAV'))
    assert set(res['errors']) == {'AlexNet(2)', 'AlexNet(5)', 'EffNet-B', 'SwAV'}
    assert NETS['alexnet'].file in res['errors']['AlexNet(2)'] and NETS['swav'].file in res['errors']['SwAV']
    assert 'download' in res['errors']['EffNet-B']
    assert np.isnan(res['SwAV']) and 0 < res['PixCorr'] < 1 and 0 < res['SSIM'] < 1 and 0 <= res['CLIP'] <= 1
    assert list(k for k in res if k != 'errors') == ['PixCorr', 'SSIM', 'AlexNet(2)', 'AlexNet(5)', 'CLIP', 'EffNet-B', 'SwAV']
    # a dict without an entry for a network: that metric errors, the rest run
    res = evaluate_images(t, t, weights={'alexnet': None}, metrics=('AlexNet(5)', 'CLIP'))
    assert res['AlexNet(5)'] == 1.0 and 'no weights given' in res['errors']['CLIP']


def test_find_weights_places(tmp_path, monkeypatch):
    monkeypatch.delenv('MINDLINK_WEIGHTS', raising=False)
    with pytest.raises(MindLinkError, match='MINDLINK_WEIGHTS is not set'): find_weights('alexnet')
    f = tmp_path / 'hub' / 'checkpoints' / NETS['alexnet'].file; f.parent.mkdir(parents=True); f.touch()
    assert find_weights('alexnet', tmp_path) == f                 # a $TORCH_HOME
    monkeypatch.setenv('MINDLINK_WEIGHTS', str(tmp_path))
    assert find_weights('alexnet') == f                           # the environment variable
    snap = tmp_path / 'models--openai--clip-vit-large-patch14' / 'snapshots' / 'abc123'; snap.mkdir(parents=True)
    (snap / 'config.json').write_text('{}')
    assert find_weights('clip') == snap                           # a Hugging Face cache
    with pytest.raises(MindLinkError, match='swav_800ep_pretrain.pth.tar'): find_weights('swav')


@pytest.mark.parametrize('net', ['alexnet', 'effnet', 'swav', 'inception'])
def test_torchvision_weights_load_through_our_loader(net, tmp_path):
    import torchvision.models as tvm
    from safetensors.torch import save_file
    build = {'alexnet': lambda: tvm.alexnet(weights=None), 'effnet': lambda: tvm.efficientnet_b1(weights=None),
             'swav': lambda: tvm.resnet50(weights=None),
             'inception': lambda: tvm.inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=False)}[net]
    torch.manual_seed(11); ref = build().eval()
    sd = ref.state_dict()
    if net == 'swav':   # SwAV's checkpoint: DataParallel prefixes, a projection head and prototypes, no fc
        sd = {f'module.{k}': v for k, v in sd.items() if not k.startswith('fc.')}
        sd['module.projection_head.0.weight'] = torch.zeros(3, 2048); sd['module.prototypes.weight'] = torch.zeros(5, 3)
    torch.save(sd, tmp_path / NETS[net].file)
    mnet = load_metric_net(net, tmp_path)
    assert mnet.weights == tmp_path / NETS[net].file
    x = photos(32)[:2]
    feats = mnet.features(x)
    # the same network run by hand with the documented preprocessing
    mean, std = torch.tensor(NETS[net].norm[0]).view(1, 3, 1, 1), torch.tensor(NETS[net].norm[1]).view(1, 3, 1, 1)
    xi = (TF.resize(x, [NETS[net].resize], interpolation=InterpolationMode.BILINEAR, antialias=True) - mean) / std
    with torch.no_grad():
        if net == 'alexnet':
            expect = {'AlexNet(2)': ref.features[:5](xi).flatten(1), 'AlexNet(5)': ref.features[:12](xi).flatten(1)}
        elif net == 'effnet': expect = {'EffNet-B': ref.avgpool(ref.features(xi)).flatten(1)}
        elif net == 'swav': ref.fc = torch.nn.Identity(); expect = {'SwAV': ref(xi)}
        else: ref.fc = torch.nn.Identity(); expect = {'Inception': ref(xi)}
    for k, v in expect.items(): torch.testing.assert_close(feats[k], v, rtol=1e-4, atol=1e-5)
    if net == 'effnet':   # safetensors works too, and a wrong checkpoint is refused with its name
        save_file(ref.state_dict(), tmp_path / 'eff.safetensors')
        torch.testing.assert_close(load_metric_net(net, tmp_path / 'eff.safetensors').features(x)['EffNet-B'], expect['EffNet-B'], rtol=1e-4, atol=1e-5)
        torch.save({'conv1.weight': torch.zeros(1)}, tmp_path / 'wrong.pth')
        with pytest.raises(MindLinkError, match='not EfficientNet-B1 weights'): load_metric_net(net, tmp_path / 'wrong.pth')
        (tmp_path / 'junk.pth').write_bytes(b'junk')
        with pytest.raises(MindLinkError, match='cannot read EfficientNet-B1'): load_metric_net(net, tmp_path / 'junk.pth')


def test_loaded_metric_net_is_reused():
    alex = load_metric_net('alexnet')
    assert load_metric_net('alexnet', alex) is alex
    with pytest.raises(MindLinkError, match="loaded 'alexnet'"): load_metric_net('swav', alex)
    t = photos(32)[:3]
    assert evaluate_images(t, t, weights={'alexnet': alex}, metrics=('AlexNet(2)',))['AlexNet(2)'] == 1.0


# ---- real pretrained weights (skipped unless present) -------------------------------------------
def _real(net):
    root = os.environ.get('MINDLINK_WEIGHTS')
    if not root: pytest.skip('set MINDLINK_WEIGHTS to a folder holding the pretrained metric networks to run this test')
    try: return find_weights(net, root)
    except MindLinkError as e: pytest.skip(f'real {NETS[net].title} weights absent: {e}')


@pytest.mark.parametrize('net', list(NETS))
def test_real_weights(net):
    path = _real(net)
    t = photos(128); p = degrade(t); shuf = t[torch.roll(torch.arange(len(t)), 1)]
    mnet = load_metric_net(net, path)
    for m in NETS[net].metrics:
        res = evaluate_images(p, t, weights={net: mnet}, metrics=(m,)); same = evaluate_images(t, t, weights={net: mnet}, metrics=(m,))
        wrong = evaluate_images(shuf, t, weights={net: mnet}, metrics=(m,))
        assert not res['errors']
        if m in ('EffNet-B', 'SwAV'): assert same[m] == pytest.approx(0, abs=1e-4) and res[m] < wrong[m]
        else: assert same[m] == 1.0 and res[m] >= 0.75 and res[m] > wrong[m]


# ---- benchmark ---------------------------------------------------------------------------------
def test_bench_metrics_small():
    threads = torch.get_num_threads()
    b = bench_metrics(n=6, size=48, sizes=(50,), n_net=3, nets=('alexnet',), threads=1)
    assert b['networks_extrapolated'] and b['n'] == 6 and b['threads'] == 1 and torch.get_num_threads() == threads
    for k in ('PixCorr_s', 'SSIM_s', 'alexnet_s', 'two_way_N50_s', 'total_s'): assert b[k] >= 0
