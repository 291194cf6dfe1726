"Reader tests on tiny NSD-layout files written on the fly, MiniNSD round trips, its two noise worlds, and every bad-input case."
import hashlib, json, re
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import scipy.io

from mindlink.data import (BETA_SCALE, NSDReader, SubjectData, betas_path, brainmask_path, expdesign_path,
                           read_session_roi, roi_path, stimuli_path)
from mindlink.mininsd import NSD_NCSNR, TINY_MINI_NSD, make_mini_nsd
from mindlink.utils import MindLinkError

SHAPE, T, N_SESS = (4, 5, 3), 6, 2          # volume, trials per session, sessions per subject
N_STIM, N_IMG = 12, 5                        # images in the brick; images per subject (first 2 shared)
SUBJECTIM = np.array([[3, 8, 1, 2, 5],       # 1-based 73k ids; columns 0-1 are the shared images 3 and 8
                      [3, 8, 10, 11, 12]])
SHAREDIX = np.array([3, 8])
MASTER = np.array([1, 3, 2, 4, 1, 5, 3, 2, 4, 5, 1, 3])  # 12 trials = 2 sessions x 6, 1-based columns
AFFINE = np.diag([1.8, 1.8, 1.8, 1.])


def _nii(data, path, affine=AFFINE):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))


def write_nsd(root, subjects=(1, 2), sessions=N_SESS, dtype=np.int16, seed=0):
    "A tiny NSD: returns {subj: raw betas (n_trials, X, Y, Z) as stored on disk}."
    rng = np.random.default_rng(seed)
    ed = expdesign_path(root); ed.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(ed, dict(subjectim=SUBJECTIM.astype(float), masterordering=MASTER[None].astype(float),
                              sharedix=SHAREDIX[None].astype(float)))
    sp = stimuli_path(root); sp.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(sp, 'w') as f:  # image k is filled with the value k, so order is checkable
        f['imgBrick'] = np.broadcast_to(np.arange(N_STIM, dtype=np.uint8)[:, None, None, None], (N_STIM, 6, 6, 3)).copy()
    raw = {}
    for s in subjects:
        roi = -np.ones(SHAPE, np.int16); roi[1:3, 1:4, :] = 0; roi[1:3, 1:4, 1:] = 1
        _nii(roi, roi_path(root, s)); _nii((roi >= 0).astype(np.int16), brainmask_path(root, s))
        b = rng.integers(-900, 900, size=(sessions*T,) + SHAPE).astype(dtype)
        for k in range(sessions):
            _nii(np.moveaxis(b[k*T:(k + 1)*T], 0, -1), betas_path(root, s, k + 1))
        raw[s] = b
    return raw


@pytest.fixture
def nsd(tmp_path):
    return tmp_path, write_nsd(tmp_path)


def _fails(f, *parts):
    "Assert `f()` raises MindLinkError whose message holds every string in `parts`."
    with pytest.raises(MindLinkError) as e: f()
    for p in parts: assert str(p) in str(e.value), f'{p!r} not in {str(e.value)!r}'
    return str(e.value)


# ---- the reader on hand-made files -------------------------------------------------------------

def test_subjects_sessions_roi(nsd):
    root, _ = nsd
    r = NSDReader(root)
    assert r.subjects() == [1, 2]
    assert [(k, n) for k, _, n in r.sessions(1)] == [(1, T), (2, T)]
    mask, aff = r.roi(1)
    assert mask.dtype == bool and mask.shape == SHAPE and mask.sum() == 2*3*2
    np.testing.assert_allclose(aff, AFFINE)


def test_trial_mapping(nsd):
    root, _ = nsd
    r = NSDReader(root)
    # trial t shows subjectim[s-1, masterordering[t]-1] - 1 (0-based)
    np.testing.assert_array_equal(r.trial_images(1), SUBJECTIM[0, MASTER - 1] - 1)
    np.testing.assert_array_equal(r.trial_images(2), SUBJECTIM[1, MASTER - 1] - 1)


def _expected(raw, mask, ids, zscore, average):
    "A slow, direct transcription of Steps 4-6 for one subject."
    x = raw[:, mask].astype(np.float64) / BETA_SCALE                       # (trials, V)
    if zscore:
        for k in range(len(x) // T):
            s = x[k*T:(k + 1)*T]
            x[k*T:(k + 1)*T] = (s - s.mean(0)) / s.std(0)
    if not average: return x, ids, np.ones(len(ids))
    u = np.unique(ids)
    return np.stack([x[ids == i].mean(0) for i in u]), u, np.array([(ids == i).sum() for i in u])


@pytest.mark.parametrize('zscore', [False, True])
@pytest.mark.parametrize('average', [False, True])
def test_load_subject_matches_direct_computation(nsd, zscore, average):
    root, raw = nsd
    r = NSDReader(root)
    sd = r.load_subject(1, zscore=zscore, average=average)
    assert isinstance(sd, SubjectData) and sd.betas.dtype == np.float32
    eb, eids, ereps = _expected(raw[1], sd.roi, r.trial_images(1), zscore, average)
    np.testing.assert_allclose(sd.betas, eb, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(sd.image_ids, eids)
    np.testing.assert_array_equal(sd.n_reps, ereps)
    if zscore and not average:  # each session's voxels have mean 0 and s.d. 1
        np.testing.assert_allclose(sd.betas[:T].mean(0), 0, atol=1e-5)
        np.testing.assert_allclose(sd.betas[:T].std(0), 1, atol=1e-5)


def test_average_counts_and_volume(nsd):
    root, raw = nsd
    sd = NSDReader(root).load_subject(1)
    # subject 1 images (0-based): columns 1..5 -> ids 2, 7, 0, 1, 4; trials per column in MASTER: 3, 2, 3, 2, 2
    np.testing.assert_array_equal(sd.image_ids, [0, 1, 2, 4, 7])
    np.testing.assert_array_equal(sd.n_reps, [3, 2, 3, 2, 2])
    v = sd.volume(2)
    assert v.shape == SHAPE and v.dtype == np.float32
    np.testing.assert_array_equal(v[sd.roi], sd.betas[2]); assert (v[~sd.roi] == 0).all()
    np.testing.assert_array_equal(sd.volumes([2])[0], v)
    sub = sd.select([7, 0])
    np.testing.assert_array_equal(sub.image_ids, [7, 0]); np.testing.assert_array_equal(sub.betas[1], sd.betas[0])
    _fails(lambda: sd.select([3]), 'subject 1', '[3]')


def test_chunked_and_uncompressed_reads(nsd):
    root, raw = nsd
    mask, aff = NSDReader(root).roi(1)
    whole = read_session_roi(betas_path(root, 1, 1), mask, aff)
    np.testing.assert_array_equal(read_session_roi(betas_path(root, 1, 1), mask, aff, chunk_bytes=1), whole)  # 1 trial a chunk
    np.testing.assert_allclose(whole, raw[1][:T][:, mask] / BETA_SCALE, rtol=1e-6)
    # an uncompressed .nii session is found and read (memory-mapped) like a .nii.gz one
    p = betas_path(root, 1, 2)
    nib.save(nib.load(str(p)), str(p.with_name('betas_session02.nii'))); p.unlink()
    np.testing.assert_allclose(NSDReader(root).load_subject(1, zscore=False, average=False).betas[T:],
                               raw[1][T:][:, mask] / BETA_SCALE, rtol=1e-6)


def test_max_sessions(nsd):
    root, _ = nsd
    sd = NSDReader(root).load_subject(1, average=False, max_sessions=1)
    assert sd.betas.shape == (T, 12)


def test_stimuli_order_and_duplicates(nsd):
    root, _ = nsd
    im = NSDReader(root).stimuli([7, 2, 7, 0])
    assert im.shape == (4, 6, 6, 3) and im.dtype == np.uint8
    np.testing.assert_array_equal(im[:, 0, 0, 0], [7, 2, 7, 0])
    assert NSDReader(root).stimuli([]).shape == (0, 6, 6, 3)


def test_split_sizes(tmp_path):
    write_nsd(tmp_path)
    # subject 2 ran only session 1: trials 0-5 show its columns 1, 3, 2, 4, 1, 5 -> shared id 3 (col 1) and 8 (col 2)
    betas_path(tmp_path, 2, 2).unlink()
    r = NSDReader(tmp_path)
    np.testing.assert_array_equal(r.shared_images([1, 2]), [2, 7])
    sp = r.split([1, 2])
    np.testing.assert_array_equal(sp[1]['test'], [2, 7])
    np.testing.assert_array_equal(sp[1]['train'], [0, 1, 4])       # subject 1's own images
    np.testing.assert_array_equal(sp[2]['train'], [9, 10, 11])
    for s in (1, 2): assert not set(sp[s]['train']) & set(sp[s]['test'])
    # a shared image not seen by every chosen subject is in neither set
    write_nsd(tmp_path / 'b'); r2 = NSDReader(tmp_path / 'b')
    master = MASTER.copy(); master[master == 2] = 1                  # nobody sees column 2 (shared id 8)
    scipy.io.savemat(expdesign_path(tmp_path / 'b'), dict(subjectim=SUBJECTIM.astype(float),
                     masterordering=master[None].astype(float), sharedix=SHAREDIX[None].astype(float)))
    sp = r2.split([1, 2])
    np.testing.assert_array_equal(sp[1]['test'], [2])
    assert 7 not in sp[1]['train'] and 7 not in sp[2]['train']


# ---- MiniNSD through the same reader -----------------------------------------------------------

def test_mini_nsd_round_trip(mini_nsd_root):
    r = NSDReader(mini_nsd_root)
    kn = TINY_MINI_NSD
    assert r.subjects() == [1, 2, 3, 4, 5]
    sp = r.split([1, 2, 3, 4])
    for s in (1, 2, 3, 4):
        assert len(sp[s]['test']) == kn['n_shared'] and len(sp[s]['train']) == kn['n_train']
    assert not set(sp[1]['train']) & set(sp[2]['train'])           # unique training images per subject
    assert len(r.split([5])[5]['train']) == kn['n_train']           # the held-out subject
    sd = r.load_subject(1)
    assert sd.betas.shape == (kn['n_shared'] + kn['n_train'], sd.roi.sum()) and np.isfinite(sd.betas).all()
    assert (sd.n_reps == 3).all() and sd.roi.shape == tuple(kn['volume_shape'])
    assert r.stimuli(sp[1]['test'][:2]).shape == (2, kn['image_size'], kn['image_size'], 3)
    # subjects differ in anatomy: different ROIs
    assert (r.roi(1)[0] != r.roi(2)[0]).any()


def test_mini_nsd_is_learnable_and_repeatable(mini_nsd_root):
    "Repetitions of an image agree far more than different images do (the signal is really there)."
    sd = NSDReader(mini_nsd_root).load_subject(1, average=False)
    ids, b = sd.image_ids, sd.betas
    same = [np.corrcoef(b[np.flatnonzero(ids == i)[0]], b[np.flatnonzero(ids == i)[1]])[0, 1] for i in np.unique(ids)]
    first = np.array([np.flatnonzero(ids == i)[0] for i in np.unique(ids)])
    diff = np.corrcoef(b[first])[np.triu_indices(len(first), 1)]
    assert np.mean(same) > np.mean(diff) + 0.2, (np.mean(same), np.mean(diff))


def test_mini_nsd_deterministic_and_reused(tmp_path, mini_nsd_root):
    make_mini_nsd(tmp_path, seed=0, show_progress=False, **TINY_MINI_NSD)
    a, b = NSDReader(tmp_path), NSDReader(mini_nsd_root)
    np.testing.assert_array_equal(a.load_subject(3).betas, b.load_subject(3).betas)
    np.testing.assert_array_equal(a.stimuli(range(5)), b.stimuli(range(5)))
    # same settings: reused as is; other settings: refused unless overwrite=True
    mtime = betas_path(tmp_path, 1, 1).stat().st_mtime_ns
    make_mini_nsd(tmp_path, seed=0, show_progress=False, **TINY_MINI_NSD)
    assert betas_path(tmp_path, 1, 1).stat().st_mtime_ns == mtime
    _fails(lambda: make_mini_nsd(tmp_path, seed=1, show_progress=False, **TINY_MINI_NSD), 'params.json', 'overwrite=True')


def test_mini_nsd_bad_knobs(tmp_path):
    _fails(lambda: make_mini_nsd(tmp_path, image_size=40), 'image_size=40', 'multiple of 16')
    _fails(lambda: make_mini_nsd(tmp_path, n_subjects=9), 'n_subjects=9', '1..8')
    _fails(lambda: make_mini_nsd(tmp_path, n_train=0), 'n_train=0', 'positive integer')
    _fails(lambda: make_mini_nsd(tmp_path, volume_shape=(8, 40, 32)), 'volume_shape=(8, 40, 32)', 'at least 12')



# ---- MiniNSD's noise worlds: snr='default' as it always was, snr='nsd' as noisy as NSD ----------

def world_digest(root) -> str:
    "sha256 over the decoded content of every file of a MiniNSD (arrays and bytes, not container metadata such as a .mat timestamp)."
    h = hashlib.sha256()
    for f in sorted(p for p in Path(root).rglob('*') if p.is_file() and 'mindlink_cache' not in p.relative_to(root).parts):   # the data, not the caches runs add
        h.update(f.relative_to(root).as_posix().encode())
        if f.name.endswith('.nii.gz'): img = nib.load(str(f)); arrs = [np.asarray(img.dataobj), img.affine]
        elif f.suffix == '.mat': m = scipy.io.loadmat(str(f)); arrs = [m[k] for k in sorted(m) if not k.startswith('__')]
        elif f.suffix == '.hdf5':
            with h5py.File(f, 'r') as g: arrs = [g['imgBrick'][:]]
        elif f.suffix == '.npz':
            with np.load(f) as z: arrs = [z[k] for k in sorted(z.files)]
        else: arrs = [np.frombuffer(f.read_bytes(), np.uint8)]
        for a in arrs: h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


# the TINY_MINI_NSD world (seed 0) as written before MiniNSD had an 'nsd' world. Computed on the project's 2-core AMD EPYC
# build machine (NumPy 2.4); another CPU's math kernels could change a float bit — check there that the forward model's
# code is unchanged before re-pinning.
DEFAULT_TINY_DIGEST = 'd4f85223e51e04816530fb04723af52832afea9e042af6a173df4b9ecffdb750'


def test_default_world_unchanged(mini_nsd_root, tmp_path):
    "snr='default' (explicit or not) writes exactly the data MiniNSD always wrote, params.json included."
    assert world_digest(mini_nsd_root) == DEFAULT_TINY_DIGEST
    params = json.loads((mini_nsd_root / 'mininsd/params.json').read_text())
    assert 'snr' not in params and 'calibration' not in params and params['version'] == 4
    make_mini_nsd(tmp_path, seed=0, snr='default', show_progress=False, **TINY_MINI_NSD)
    assert world_digest(tmp_path) == DEFAULT_TINY_DIGEST


def test_cli_snr_nsd_end_to_end(tmp_path, mini_nsd_root, capsys):
    "`mindlink data mini-nsd --snr nsd` writes the noisy world and records it; the data land on NSD's noise ceiling."
    from mindlink.cli import main
    out = tmp_path / 'nsd'
    assert main(['data', 'mini-nsd', '--out', str(out), '--tiny', '--snr', 'nsd']) == 0
    params = json.loads((out / 'mininsd/params.json').read_text())
    assert params['snr'] == 'nsd' and params['calibration']['target_ncsnr'] == NSD_NCSNR
    m = params['calibration']['noise_scale']
    assert 1.2 < m < 3, m
    assert main(['data', 'mini-nsd', '--out', str(out), '--tiny', '--snr', 'nsd']) == 0     # same settings: reused
    a, b = NSDReader(out), NSDReader(mini_nsd_root)
    # the same world but its noise: same anatomy and stimuli, σ_s scaled by m
    assert (a.roi(3)[0] == b.roi(3)[0]).all() and (a.stimuli(range(4)) == b.stimuli(range(4))).all()
    ta, tb = (np.load(r / 'mininsd/subj03_truth.npz') for r in (out, mini_nsd_root))
    np.testing.assert_allclose(ta['noise'], m * tb['noise']); np.testing.assert_array_equal(ta['u'], tb['u'])
    nc = {w: np.median(np.concatenate([r.roi_noise_ceiling(s).ncsnr for s in r.subjects()])) for w, r in (('nsd', a), ('default', b))}
    assert abs(nc['nsd'] - NSD_NCSNR) < .05 and nc['default'] > nc['nsd'] + .2, nc
    # a default world is not an nsd world: other settings
    assert main(['data', 'mini-nsd', '--out', str(out), '--tiny']) == 2
    assert 'other settings' in capsys.readouterr().err


def test_snr_bad_input(tmp_path, capsys):
    from mindlink.cli import main
    _fails(lambda: make_mini_nsd(tmp_path, snr='loud'), "snr='loud'", "['default', 'nsd']")
    _fails(lambda: make_mini_nsd(tmp_path, snr='nsd', noise=2.0), 'noise=2.0', "snr='nsd' sets the noise level")
    assert main(['data', 'mini-nsd', '--out', str(tmp_path / 'm'), '--tiny', '--snr', 'loud']) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith('mindlink data: error:') and "snr='loud'" in err and 'Traceback' not in err

def test_rows_with_unsorted_trials(nsd):
    root, _ = nsd
    sd = NSDReader(root).load_subject(1, average=False)              # rows are trials, ids in trial order
    r = sd.rows([7, 2])
    assert (sd.image_ids[r] == [7, 2]).all() and list(r) == [list(sd.image_ids).index(7), list(sd.image_ids).index(2)]


# ---- bad input: each a clear error naming the file and what was expected -----------------------

def test_missing_files(nsd):
    root, _ = nsd
    _fails(lambda: NSDReader(root / 'nope'), 'nope', 'not found')
    roi_path(root, 1).unlink()
    _fails(lambda: NSDReader(root).roi(1), str(roi_path(root, 1)), 'file not found', 'nsdgeneral')
    _fails(lambda: NSDReader(root).load_subject(1), str(roi_path(root, 1)), 'file not found')
    expdesign_path(root).unlink()
    _fails(lambda: NSDReader(root).trial_images(2), str(expdesign_path(root)), 'file not found', 'subjectim')
    stimuli_path(root).unlink()
    _fails(lambda: NSDReader(root).stimuli([0]), str(stimuli_path(root)), 'file not found', 'imgBrick')
    betas_path(root, 2, 1).unlink()                                # a gap: session 2 without session 1
    _fails(lambda: NSDReader(root).sessions(2), str(betas_path(root, 2, 1)), 'file not found', 'without gaps')


def test_no_subjects(tmp_path):
    _fails(lambda: NSDReader(tmp_path).subjects(), 'no subjects found', 'betas_session01.nii.gz')


def test_betas_mask_shape_mismatch(nsd):
    root, raw = nsd
    _nii(np.zeros((4, 5, 2, T), np.int16), betas_path(root, 1, 2))
    msg = _fails(lambda: NSDReader(root).load_subject(1), str(betas_path(root, 1, 2)), '(4, 5, 2)', '(4, 5, 3)', str(roi_path(root, 1)))
    assert 'same func1pt8mm space' in msg


def test_betas_mask_affine_mismatch(nsd):
    root, raw = nsd
    _nii(np.moveaxis(raw[1][:T], 0, -1), betas_path(root, 1, 1), affine=np.diag([2., 2., 2., 1.]))
    _fails(lambda: NSDReader(root).load_subject(1), str(betas_path(root, 1, 1)), 'affine', str(roi_path(root, 1)))


def test_betas_not_4d(nsd):
    root, _ = nsd
    _nii(np.zeros(SHAPE, np.int16), betas_path(root, 1, 1))
    _fails(lambda: NSDReader(root).load_subject(1), str(betas_path(root, 1, 1)), 'expected 4D')


@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf])
def test_non_finite_betas(tmp_path, bad):
    raw = write_nsd(tmp_path, dtype=np.float32)
    b = raw[1][T:].copy(); b[3, 1, 2, 1] = bad                     # session 2, trial 3, inside the ROI
    _nii(np.moveaxis(b, 0, -1), betas_path(tmp_path, 1, 2))
    _fails(lambda: NSDReader(tmp_path).load_subject(1), str(betas_path(tmp_path, 1, 2)), 'non-finite', 'trial 3')
    assert NSDReader(tmp_path).load_subject(2).betas.shape[0] == N_IMG   # the other subject still loads


def _design(root, **kw):
    d = dict(subjectim=SUBJECTIM.astype(float), masterordering=MASTER[None].astype(float),
             sharedix=SHAREDIX[None].astype(float)); d.update(kw)
    scipy.io.savemat(expdesign_path(root), d)


def test_trial_ids_outside_stimulus_set(nsd):
    root, _ = nsd
    sim = SUBJECTIM.copy(); sim[0, 3] = N_STIM + 1                 # column 4 -> a 73k id beyond the brick
    _design(root, subjectim=sim.astype(float))
    _fails(lambda: NSDReader(root).trial_images(1), str(expdesign_path(root)), str(stimuli_path(root)),
           f'73k id {N_STIM + 1}', f'1..{N_STIM}')
    NSDReader(root).trial_images(2)                                # subject 2's row is fine


def test_masterordering_outside_subjectim(nsd):
    root, _ = nsd
    m = MASTER.copy(); m[4] = N_IMG + 1
    _design(root, masterordering=m[None].astype(float))
    _fails(lambda: NSDReader(root).trial_images(1), str(expdesign_path(root)), 'masterordering[4]', f'1..{N_IMG}')


def test_more_trials_than_masterordering(nsd):
    root, _ = nsd
    _design(root, masterordering=MASTER[None, :T + 2].astype(float))
    _fails(lambda: NSDReader(root).load_subject(1), 'mismatched trial indices', f'{2*T} trials', f'only {T + 2}')


def test_bad_expdesign(nsd):
    root, _ = nsd
    scipy.io.savemat(expdesign_path(root), dict(subjectim=SUBJECTIM.astype(float)))
    _fails(lambda: NSDReader(root).trial_images(1), str(expdesign_path(root)), 'masterordering', 'missing')
    expdesign_path(root).write_bytes(b'not a mat file')
    _fails(lambda: NSDReader(root).trial_images(1), str(expdesign_path(root)), 'not a readable .mat')


@pytest.mark.parametrize('subj', [3, 0, 9, 'one', 1.5, None])
def test_unknown_subject(nsd, subj):
    root, _ = nsd
    r = NSDReader(root)
    for f in (r.roi, r.trial_images, r.load_subject, lambda s: r.split([1, s])):
        _fails(lambda: f(subj), f'unknown subject {subj!r}', 'holds subjects [1, 2]')


def test_empty_roi(nsd):
    root, _ = nsd
    _nii(np.where(np.ones(SHAPE), 0, -1).astype(np.int16), roi_path(root, 1))
    _fails(lambda: NSDReader(root).load_subject(1), str(roi_path(root, 1)), 'empty ROI', 'no voxel > 0')


def test_truncated_hdf5(nsd):
    root, _ = nsd
    p = stimuli_path(root)
    p.write_bytes(p.read_bytes()[:1000])
    _fails(lambda: NSDReader(root).stimuli([0]), str(p), 'truncated or corrupt', 'imgBrick')
    _fails(lambda: NSDReader(root).trial_images(1), str(p), 'truncated or corrupt')


def test_hdf5_without_imgbrick(nsd):
    root, _ = nsd
    with h5py.File(stimuli_path(root), 'w') as f: f['images'] = np.zeros((2, 4, 4, 3), np.uint8)
    _fails(lambda: NSDReader(root).stimuli([0]), str(stimuli_path(root)), 'imgBrick is missing', '(n, H, W, 3) uint8')


def test_stimulus_ids_out_of_range(nsd):
    root, _ = nsd
    _fails(lambda: NSDReader(root).stimuli([0, N_STIM]), str(stimuli_path(root)), f'[{N_STIM}]', f'0..{N_STIM - 1}')
    _fails(lambda: NSDReader(root).stimuli([-1]), '[-1]')


def test_truncated_betas(nsd):
    root, _ = nsd
    p = betas_path(root, 1, 2)
    p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 2])
    _fails(lambda: NSDReader(root).load_subject(1), str(p))
