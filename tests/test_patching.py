"Patching: bad input, store resume, loader workers (the contract itself is tested inline in nbs/02_patching.ipynb)."
import nibabel as nib
import numpy as np
import pytest
import torch

from mindlink.data import NSDReader
from mindlink.mininsd import make_mini_nsd
from mindlink.patching import PatchDataset, PatchLayout, PatchStore, make_loader, patchify, unpatchify
from mindlink.utils import MindLinkError, load_json


@pytest.fixture(scope='module')
def reader(tmp_path_factory):
    root = tmp_path_factory.mktemp('nsd')
    return NSDReader(make_mini_nsd(root, n_subjects=3, n_shared=10, n_train=20, n_reps=2, show_progress=False))


def ball(shape, centre, r):
    g = np.indices(shape)
    return ((g - np.reshape(centre, (3, 1, 1, 1))) ** 2).sum(0) <= r ** 2


# ---------------------------------------------------------------- bad input
def test_volume_shape_differs_from_mask():
    lay = PatchLayout.fit({1: ball((20, 20, 20), (10, 10, 10), 5)}, patch=4)
    with pytest.raises(MindLinkError, match=r'shape \(20, 20, 21\) differs from its ROI mask'):
        lay.tokens(1, np.zeros((20, 20, 21), np.float32))
    with pytest.raises(MindLinkError, match='betas of subject 1: expected'):
        lay.roi_tokens(1, np.zeros((2, 7)))


def test_volume_affine_differs_from_mask(tmp_path):
    m = ball((20, 20, 20), (10, 10, 10), 5)
    lay = PatchLayout.fit({1: (m, np.diag([1.8, 1.8, 1.8, 1]))}, patch=4)
    p = tmp_path / 'betas.nii.gz'
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 20), np.float32), np.diag([2., 2., 2., 1.])), p)
    with pytest.raises(MindLinkError, match='betas.nii.gz.*affine differs from the ROI mask of subject 1'):
        lay.tokens(1, nib.load(p))
    ok = nib.Nifti1Image(np.ones((20, 20, 20), np.float32), np.diag([1.8, 1.8, 1.8, 1]))
    assert lay.tokens(1, ok).sum() == m.sum()


def test_box_smaller_than_roi():
    rois = {1: ball((30, 30, 30), (15, 15, 15), 9), 2: ball((30, 30, 30), (12, 14, 15), 4)}
    with pytest.raises(MindLinkError, match=r'box \(16, 24, 24\) is smaller than the ROI of subject 1'):
        PatchLayout.fit(rois, patch=4, box=(16, 24, 24))
    lay = PatchLayout.fit({2: rois[2]}, patch=4)
    with pytest.raises(MindLinkError, match='smaller than the ROI of subject 1'):
        lay.with_subject(1, rois[1])


def test_patch_does_not_divide_box():
    with pytest.raises(MindLinkError, match=r'patch 10 does not divide box \(60, 64, 60\) along axis 1'):
        PatchLayout.fit({1: ball((70, 70, 70), (35, 35, 35), 20)}, patch=10, box=(60, 64, 60))
    with pytest.raises(MindLinkError, match='does not divide box'):
        patchify(np.zeros((8, 8, 8)), (0, 0, 0), (8, 8, 6), 4)
    with pytest.raises(MindLinkError, match='patch: expected a positive integer'):
        patchify(np.zeros((8, 8, 8)), (0, 0, 0), (8, 8, 8), 0)


def test_bad_shapes_and_records():
    with pytest.raises(MindLinkError, match=r'expected \(\.\.\., 8, 8\)'):
        unpatchify(np.zeros((3, 8)), (0, 0, 0), (4, 4, 4), (4, 4, 4), 2)
    with pytest.raises(MindLinkError, match='empty'):
        PatchLayout.fit({1: np.zeros((8, 8, 8), bool)}, patch=4)
    lay = PatchLayout.fit({1: ball((12, 12, 12), (6, 6, 6), 3)}, patch=4)
    with pytest.raises(MindLinkError, match=r"unknown keys \['colour'\]"):
        PatchLayout.from_dict({**lay.to_dict(), 'colour': 'red'})


def test_patchify_roundtrip_random_geometry():
    rng = np.random.default_rng(1)
    for _ in range(20):
        shape = tuple(rng.integers(5, 15, 3)); p = int(rng.integers(1, 5))
        box = tuple(int(p * rng.integers(1, 5)) for _ in range(3)); origin = tuple(int(rng.integers(-4, 6)) for _ in range(3))
        v = rng.standard_normal((2,) + shape)
        back = unpatchify(patchify(v, origin, box, p), origin, box, shape, p)
        inbox = np.zeros(shape, bool)
        inbox[tuple(slice(max(o, 0), max(min(o + b, s), 0)) for o, b, s in zip(origin, box, shape))] = True
        np.testing.assert_array_equal(back[:, inbox], v[:, inbox])
        assert not back[:, ~inbox].any()


# ---------------------------------------------------------------- store
def test_store_errors(reader, tmp_path):
    with pytest.raises(MindLinkError, match='not a patch store'):
        PatchStore(tmp_path / 'nothing')
    with pytest.raises(MindLinkError, match=r'subjects \[7\] are not in the data set'):
        PatchStore.build(reader, [1, 7], tmp_path / 's', patch=4)
    PatchStore.build(reader, [1], tmp_path / 's', patch=4)
    with pytest.raises(MindLinkError, match='another layout or dtype'):
        PatchStore.build(reader, [1], tmp_path / 's', patch=4, dtype='float32')
    other = PatchLayout.fit({1: reader.roi(1)}, patch=4, box=(40, 40, 40))
    with pytest.raises(MindLinkError, match='another layout or dtype'):
        PatchStore.build(reader, [1], tmp_path / 's', layout=other)
    with pytest.raises(MindLinkError, match='subject 2 is not in this store'):
        PatchStore(tmp_path / 's').tokens(2)
    with pytest.raises(MindLinkError, match=r"load_subject options \{\}, not \{'zscore': False\}"):
        PatchStore.build(reader, [2], tmp_path / 's', zscore=False)
    wrong = PatchLayout.fit({1: reader.roi(2)}, patch=4)       # subject 1 fitted on another subject's ROI
    with pytest.raises(MindLinkError, match='ROI of subject 1 from the reader'):
        PatchStore.build(reader, [1], tmp_path / 's2', layout=wrong)


def test_store_rejects_nan(reader, tmp_path, monkeypatch):
    real = NSDReader.load_subject
    def nan_load(self, s, **kw):
        sd = real(self, s, **kw); sd.betas[0, 0] = np.nan; return sd
    monkeypatch.setattr(NSDReader, 'load_subject', nan_load)
    with pytest.raises(MindLinkError, match='subject 1: betas contain NaN'):
        PatchStore.build(reader, [1], tmp_path / 's', patch=4)


def test_store_resumes_mid_subject(reader, tmp_path, monkeypatch):
    ref = PatchStore.build(reader, [1, 2], tmp_path / 'ref', patch=4, chunk=8)
    calls, real = [], PatchLayout.roi_tokens
    def dying(self, s, betas):
        calls.append(s)
        if len(calls) == 6: raise KeyboardInterrupt            # killed during subject 2's 2nd chunk
        return real(self, s, betas)
    monkeypatch.setattr(PatchLayout, 'roi_tokens', dying)
    with pytest.raises(KeyboardInterrupt):
        PatchStore.build(reader, [1, 2], tmp_path / 'st', patch=4, chunk=8)
    n2 = len(reader.load_subject(2).image_ids)
    assert PatchStore(tmp_path / 'st').subjects == [1]
    with pytest.raises(MindLinkError, match='subject 2 is not finished'):
        PatchStore(tmp_path / 'st').tokens(2)
    assert load_json(tmp_path / 'st/subj02/progress.json')['rows_done'] == 8
    calls.clear(); monkeypatch.setattr(PatchLayout, 'roi_tokens', lambda self, s, b: (calls.append(s), real(self, s, b))[1])
    st = PatchStore.build(reader, [1, 2], tmp_path / 'st', patch=4, chunk=8)
    assert calls == [2] * (-(-(n2 - 8) // 8))                   # only subject 2's remaining chunks
    for s in (1, 2):
        np.testing.assert_array_equal(st.tokens(s), ref.tokens(s))
        np.testing.assert_array_equal(st.image_ids(s), ref.image_ids(s))
    assert not (tmp_path / 'st/subj02/progress.json').exists()


def test_store_extends_to_new_subject(reader, tmp_path):
    lay = PatchLayout.fit({s: reader.roi(s) for s in reader.subjects()}, patch=4)
    PatchStore.build(reader, [1, 2], tmp_path / 's', layout=lay)
    st = PatchStore.build(reader, [3], tmp_path / 's')           # reuses the store's layout
    assert st.subjects == [1, 2, 3] and st.layout.same_as(lay)
    sd = reader.load_subject(3)
    np.testing.assert_allclose(st.tokens(3)[:].astype(np.float32), lay.roi_tokens(3, sd.betas), atol=2e-2)


# ---------------------------------------------------------------- dataset and loader
def test_dataset_errors_and_targets(reader, tmp_path):
    st = PatchStore.build(reader, [1, 2], tmp_path / 's', patch=4, dtype='float32')
    ids = np.unique(np.concatenate([st.image_ids(s) for s in st.subjects]))
    with pytest.raises(MindLinkError, match='targets: 1 image ids are missing'):
        PatchDataset(st, targets=(ids[1:], np.zeros((len(ids) - 1, 4, 8))))
    with pytest.raises(MindLinkError, match='subject 2: 1 image ids are missing'):
        PatchDataset(st, image_ids={1: st.image_ids(1)[:3], 2: [99_999]})
    with pytest.raises(MindLinkError, match='subject 3 is not in this store'):
        PatchDataset(st, subjects=[1, 3])
    z = np.random.default_rng(0).standard_normal((len(ids), 4, 8)).astype(np.float32)
    ds = PatchDataset(st, subjects=[2, 1], targets=(ids, z))
    b = ds[np.arange(len(ds))[::-1]]
    for k in range(len(ds)):
        s = ds.subjects[int(b['subject'][k])]
        row = np.searchsorted(st.image_ids(s), int(b['image_id'][k]))
        np.testing.assert_array_equal(b['patches'][k].numpy(), st.tokens(s)[row])
        np.testing.assert_array_equal(b['target'][k].numpy(), z[np.searchsorted(ids, int(b['image_id'][k]))])
    with pytest.raises(IndexError):
        ds[len(ds)]
    # order is kept even when the requested ids are not in disk order (predictions line up with the ids asked for)
    want = st.image_ids(2)[::-1][:7]
    sub = PatchDataset(st, [2], image_ids={2: want})
    got = next(iter(torch.utils.data.DataLoader(sub, batch_size=7, shuffle=False)))
    np.testing.assert_array_equal(got['image_id'].numpy(), want)
    rows = np.searchsorted(st.image_ids(2), want)
    np.testing.assert_array_equal(got['patches'].numpy(), st.tokens(2)[rows])


def test_loader_workers_match_main_process(reader, tmp_path):
    st = PatchStore.build(reader, [1, 2, 3], tmp_path / 's', patch=4)
    ds = PatchDataset(st, dtype=torch.float16)
    a = list(make_loader(ds, batch_size=16, seed=3))
    b = list(make_loader(ds, batch_size=16, seed=3, num_workers=2))
    assert len(a) == len(b) == -(-len(ds) // 16)
    for x, y in zip(a, b):
        assert torch.equal(x['patches'], y['patches']) and torch.equal(x['image_id'], y['image_id'])
    assert torch.cat([x['subject'] * 10**6 + x['image_id'] for x in a]).unique().numel() == len(ds)
    c = next(iter(make_loader(ds, batch_size=16, seed=4)))
    assert not torch.equal(c['image_id'], a[0]['image_id'])      # the seed matters
    ds.preload()
    assert torch.equal(ds[[3, 1, 2]]['patches'], PatchDataset(st, dtype=torch.float16)[[3, 1, 2]]['patches'])


def test_batch_into_buffer(reader, tmp_path):
    st = PatchStore.build(reader, [1, 2], tmp_path / 's', patch=4)
    ds = PatchDataset(st)
    buf = torch.full((5, st.layout.n_patches, st.layout.patch_dim), float('nan'))
    b = ds.batch([0, 7, 40, 3, 2], out=buf)
    assert b['patches'] is buf and torch.equal(buf, ds[[0, 7, 40, 3, 2]]['patches'])
    with pytest.raises(MindLinkError, match='out: expected shape'):
        ds.batch([0, 1], out=buf)
    cat = st.catalog()
    assert list(cat.columns) == ['subject', 'row', 'image_id', 'n_reps'] and len(cat) == len(ds)


def test_loader_through_accelerate(reader, tmp_path):
    from accelerate import Accelerator
    st = PatchStore.build(reader, [1, 2], tmp_path / 's', patch=4)
    ds = PatchDataset(st)
    dl = Accelerator(cpu=True).prepare(make_loader(ds, batch_size=16, seed=0))
    got = list(dl)
    assert [len(b['subject']) for b in got] == [16] * (len(ds) // 16) + ([len(ds) % 16] if len(ds) % 16 else [])
    assert torch.cat([b['subject'] * 10**6 + b['image_id'] for b in got]).unique().numel() == len(ds)


_BUILD = ('import sys; from mindlink.data import NSDReader; from mindlink.patching import PatchStore\n'
          'r = NSDReader(sys.argv[1]); print("ready", flush=True)\n'
          'print(PatchStore.build(r, [1, 2], sys.argv[2], patch=4, chunk=4).subjects, flush=True)')


def _builder(reader, out):
    import os, subprocess, sys
    return subprocess.Popen([sys.executable, '-c', _BUILD, str(reader.root), str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, 'MINDLINK_NO_PROGRESS': '1', 'OMP_NUM_THREADS': '1'})


def test_store_one_builder_at_a_time(reader, tmp_path):
    """A build waits while another process holds the store folder, then builds; two builds started together end
    with one complete store, equal to a build alone; a build refused before writing leaves no new folder."""
    import fcntl, time
    (tmp_path / 'held').mkdir()
    with open(tmp_path / 'held' / '.building', 'a') as f:
        fcntl.flock(f, fcntl.LOCK_EX)                       # another builder holds the folder
        p = _builder(reader, tmp_path / 'held')
        assert p.stdout.readline().strip() == 'ready'
        time.sleep(3)
        assert p.poll() is None, p.communicate()            # still waiting (a build alone takes well under a second)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0 and out.strip() == '[1, 2]', err[-2000:]
    ps = [_builder(reader, tmp_path / 'st') for _ in range(2)]
    outs = [q.communicate(timeout=120) for q in ps]
    assert all(q.returncode == 0 for q in ps), [e[-2000:] for _, e in outs]
    ref = PatchStore.build(reader, [1, 2], tmp_path / 'ref', patch=4, chunk=4)
    for st in (PatchStore(tmp_path / 'st'), PatchStore(tmp_path / 'held')):
        for s in (1, 2): np.testing.assert_array_equal(st.tokens(s), ref.tokens(s))
    assert not list((tmp_path / 'st').rglob('*.partial.npy')) and not list((tmp_path / 'st').rglob('progress.json'))
    with pytest.raises(MindLinkError, match='ROI of subject 1 from the reader'):
        PatchStore.build(reader, [1], tmp_path / 'refused', layout=PatchLayout.fit({1: reader.roi(2)}, patch=4))
    assert not (tmp_path / 'refused').exists()
