"""Bad input and faults, one test per class (chapter 14's table; chapters 8, 8a, 8b): each ends in a one-line error
(exit status 2, no traceback) or the meaning the user wrote, and loses nothing."""
import errno, json, math, shutil, signal, subprocess, sys, time
from pathlib import Path
from unittest import mock

import nibabel as nib
import numpy as np
import pytest
import torch

from mindlink.cli import main
from mindlink.data import NSDReader
from mindlink.mininsd import TINY_MINI_NSD, make_mini_nsd
from mindlink.model import MindLinkConfig
from mindlink.patching import PatchStore
from mindlink.prepare import prepare_data
from mindlink.runs import CSVLog, RunLock, checkpoint_dir, load_checkpoint, run_record
from mindlink.utils import MindLinkError

QUICK = ['--set', 'epochs=2', '--set', 'warmup_epochs=1', '--set', 'batch_size=16', '--set', 'eval_every=1', '--set', 'ckpt_every=1']


def refused(capsys, argv, *expected):
    "`mindlink ARGV` must end in exit status 2 with one line on stderr naming what is wrong (argparse's errors exit the same way)."
    try: status = main([str(a) for a in argv])
    except SystemExit as e: status = e.code
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert status == 2 and len(err) == 1 and 'Traceback' not in err[0], (status, err)
    for e in expected: assert e in err[0], err[0]
    return err[0]


@pytest.fixture(scope='module')
def root(tmp_path_factory):
    "A MiniNSD of the tests' size, private to this module (runs write their caches into it)."
    return make_mini_nsd(tmp_path_factory.mktemp('bad') / 'mini', seed=0, show_progress=False, **TINY_MINI_NSD)


@pytest.fixture(scope='module')
def run(root, tmp_path_factory):
    "A run trained for two short epochs on subjects 1-4."
    out = tmp_path_factory.mktemp('bad') / 'run'
    assert main(['train', '--data', str(root), '--out', str(out), *QUICK]) == 0
    return out


@pytest.fixture(scope='module')
def other(root, tmp_path_factory):
    "Other data in the same layout: the same MiniNSD settings, another seed."
    return make_mini_nsd(tmp_path_factory.mktemp('bad') / 'other', seed=1, show_progress=False, **TINY_MINI_NSD)


def test_config_fields_are_typed_and_ranged():
    "Every field is checked where a config is built: a wrong type or a value out of range is an error, the right ones pass."
    for bad in [dict(patch=-2), dict(enc_layers=-1), dict(tau=math.nan), dict(use_subject_loss='False'), dict(compile='no'),
                dict(lr='abc'), dict(lr=-1.0), dict(dropout=2.0), dict(betas=(2, 2)), dict(batch_size=0), dict(n_heads=0),
                dict(eval_every=0), dict(ckpt_every=0), dict(grad_accum=0), dict(weight_decay=-5.0)]:
        with pytest.raises(MindLinkError, match=next(iter(bad))): MindLinkConfig.tiny().replace(**bad)
    cfg = MindLinkConfig.tiny().replace(use_subject_loss=False, lr=1, betas=[0.9, 0.99])   # an int for a float, a list for a pair
    assert cfg.use_subject_loss is False and cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.betas == (0.9, 0.99)


def test_set_reads_python_and_json_spellings(root, tmp_path, capsys):
    "`--set use_subject_loss=False` means False (it was the string 'False', which is true); a word that is no boolean is refused."
    for spelling in ('False', 'false'):
        out = tmp_path / spelling
        assert main(['train', '--data', str(root), '--out', str(out), *QUICK, '--set', f'use_subject_loss={spelling}', '--max-steps', '1']) == 0
        assert json.loads((out / 'config.json').read_text())['use_subject_loss'] is False
    refused(capsys, ['train', '--data', root, '--out', tmp_path / 'x', '--set', 'use_subject_loss=no'], 'use_subject_loss')
    refused(capsys, ['train', '--data', root, '--out', tmp_path / 'x', '--set', 'compile=no'], 'compile')
    assert not (tmp_path / 'x').exists()                                       # refused before anything was written


def test_config_files(root, tmp_path, capsys):
    "A config file that is missing, a folder, binary, malformed or not a mapping: one line naming the file."
    (tmp_path / 'bad.yaml').write_text('lr: [1e-3\n'); (tmp_path / 'list.yaml').write_text('- 1\n')
    (tmp_path / 'binary.json').write_bytes(bytes(range(256))); (tmp_path / 'folder').mkdir()
    for name in ('none.yaml', 'folder', 'binary.json', 'bad.yaml', 'list.yaml'):
        with pytest.raises(MindLinkError, match=name): MindLinkConfig.load(tmp_path / name)
        refused(capsys, ['train', '--data', root, '--out', tmp_path / 'x', '--config', tmp_path / name], name)


def test_arguments_checked_before_work(root, tmp_path, capsys):
    "Counts of zero or below, a subject twice, a device that is not there: refused before anything is written."
    train = lambda *extra: ['train', '--data', root, '--out', tmp_path / 'x', *QUICK, *extra]
    refused(capsys, train('--n-train', '0'), '--n-train')             # trained on every image
    refused(capsys, train('--n-train', '-5'), '--n-train')            # trained on all but 5
    refused(capsys, train('--max-steps', '0'), '--max-steps')         # ran the whole schedule
    refused(capsys, train('--subjects', '1', '1', '2'), 'more than once')
    refused(capsys, train('--subjects', '9'), '9')
    refused(capsys, train('--device', 'banana'), 'banana')
    refused(capsys, train('--set', 'patch=100'), 'patch')             # 3 GB of patches for a 20x24x20 volume
    if not torch.cuda.is_available(): refused(capsys, train('--device', 'cuda'), 'cuda')   # was a silent CPU run
    refused(capsys, ['reconstruct', '--run', tmp_path, '--data', root, '--out', tmp_path / 'r', '--n', '-1'], '--n')
    refused(capsys, ['experiments', '--out', tmp_path / 'e', '--jobs', '0'], '--jobs')
    assert not (tmp_path / 'x').exists() and not (tmp_path / 'r').exists()


def test_a_run_is_bound_to_its_data(run, root, other, tmp_path, capsys):
    "Resume, evaluate, reconstruct and adapt refuse other data or other subjects, naming both sides; the record stays the run's."
    record = (run / 'data.json').read_text()
    assert run_record(run)['fingerprint']['hash'] and run_record(run)['subjects'] == [1, 2, 3, 4]
    refused(capsys, ['train', '--data', other, '--out', run, '--resume', *QUICK], 'trained on other data', 'fingerprint')
    refused(capsys, ['train', '--data', root, '--out', run, '--resume', '--subjects', '1', '2', *QUICK], 'subjects')
    refused(capsys, ['evaluate', '--run', run, '--data', other], 'trained on other data')
    refused(capsys, ['reconstruct', '--run', run, '--data', other, '--out', tmp_path / 'r'], 'trained on other data')
    refused(capsys, ['adapt', '--run', run, '--data', other, '--out', tmp_path / 'a', '--sizes', '12'], 'trained on other data')
    assert (run / 'data.json').read_text() == record and not (tmp_path / 'r').exists()


def test_changed_data_rebuilds_the_cache(root, tmp_path):
    "The patch cache is keyed on the files it was built from: a subject's changed session is rebuilt, the others are kept."
    data = tmp_path / 'mini'
    shutil.copytree(root, data, ignore=shutil.ignore_patterns('mindlink_cache'))
    cfg = MindLinkConfig.tiny()
    before = prepare_data(cfg, data, subjects=[1, 2]).store
    tok1, tok2 = np.array(before.tokens(1)), np.array(before.tokens(2))
    _, f, _ = NSDReader(data).sessions(1)[0]
    img = nib.load(f)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[..., ::-1].copy(), img.affine, img.header), f)   # the trials in another order
    after = prepare_data(cfg, data, subjects=[1, 2]).store
    assert not np.array_equal(np.array(after.tokens(1)), tok1)                  # rebuilt from the files there now
    np.testing.assert_array_equal(np.array(after.tokens(2)), tok2)              # subject 2's files did not change


def test_stored_arrays_and_checkpoints_are_checked(run, root, tmp_path):
    "A truncated patch array is a MindLinkError (it was a SIGBUS); a checkpoint altered by one bit, same size, is refused."
    folder = next((root / 'mindlink_cache').glob('patches_p*'))
    copy = tmp_path / 'store'; shutil.copytree(folder, copy)
    f = copy / 'subj01' / 'tokens.npy'; f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(MindLinkError, match='truncated or corrupt|shape'): PatchStore(copy).tokens(1)
    ckpt = tmp_path / 'ckpt'; shutil.copytree(checkpoint_dir(run), ckpt)
    opt = ckpt / 'optimizer.pt'; b = bytearray(opt.read_bytes()); b[-20] ^= 1; opt.write_bytes(bytes(b))
    with pytest.raises(MindLinkError, match='SHA-256'): load_checkpoint(ckpt)
    load_checkpoint(checkpoint_dir(run))                                        # the untouched one loads


def test_one_writer_per_run_folder(root, tmp_path, capsys):
    "A second writer is refused with the holder's name; the lock goes with its holder."
    out = tmp_path / 'held'
    with RunLock(out):
        refused(capsys, ['train', '--data', root, '--out', out, *QUICK], 'in use by pid')
        with pytest.raises(MindLinkError, match='in use by'): RunLock(out)
    RunLock(out).release()                                                      # free again


def test_log_appends_never_repeat_the_header(root, tmp_path):
    "An interrupted and resumed run's log.csv has one header and each step once."
    out = tmp_path / 'r'
    assert main(['train', '--data', str(root), '--out', str(out), *QUICK, '--max-steps', '3']) == 0
    assert main(['train', '--data', str(root), '--out', str(out), *QUICK, '--resume']) == 0
    lines = (out / 'log.csv').read_text().splitlines()
    assert sum(l.startswith('step,') for l in lines) == 1
    steps = [int(float(l.split(',')[0])) for l in lines[1:]]
    assert steps == sorted(set(steps)) and steps
    log = CSVLog(tmp_path / 'two.csv'); log.write(dict(step=1, loss=1.0))
    CSVLog(tmp_path / 'two.csv', keep_until=1).write(dict(step=2, loss=0.5))    # a second writer that resumes it
    assert (tmp_path / 'two.csv').read_text() == 'step,loss\n1,1.0\n2,0.5\n'


def test_outputs_checked_before_long_work(run, root, tmp_path, capsys):
    "`evaluate --out` an existing file is refused before anything is scored (the scores were computed, then lost)."
    (tmp_path / 'afile').write_text('keep me')
    with mock.patch('mindlink.pipeline.score_run', side_effect=AssertionError('scored before checking --out')):
        refused(capsys, ['evaluate', '--run', run, '--data', root, '--out', tmp_path / 'afile'], 'afile')
    assert (tmp_path / 'afile').read_text() == 'keep me'


def test_a_full_disk_keeps_the_last_checkpoint(root, tmp_path, capsys):
    "ENOSPC while writing a checkpoint: one line saying so, no half-written folder, the previous checkpoint intact."
    out = tmp_path / 'r'
    assert main(['train', '--data', str(root), '--out', str(out), *QUICK, '--max-steps', '3']) == 0
    kept = checkpoint_dir(out)
    with mock.patch('mindlink.training.commit_checkpoint', side_effect=OSError(errno.ENOSPC, 'No space left on device')):
        refused(capsys, ['train', '--data', root, '--out', out, *QUICK, '--resume'], 'disk is full')
    assert checkpoint_dir(out) == kept and not list((out / 'checkpoints').glob('.*tmp*'))
    load_checkpoint(kept)


def test_ctrl_c_exits_130_and_resumes(root, tmp_path):
    "SIGINT during training: a checkpoint, exit status 130, no traceback; `--resume` finishes the run."
    out = tmp_path / 'r'
    args = ['train', '--data', str(root), '--out', str(out), '--set', 'epochs=40', '--set', 'warmup_epochs=1',
            '--set', 'batch_size=16', '--set', 'log_every=1']
    p = subprocess.Popen([sys.executable, '-m', 'mindlink.cli', *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not ((out / 'log.csv').exists() and (out / 'log.csv').stat().st_size > 0):
        assert p.poll() is None and time.time() - t0 < 300, p.communicate()
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130 and 'Traceback' not in err, err
    step = json.loads((checkpoint_dir(out) / 'trainer_state.json').read_text())['step']
    assert main([*args, '--resume', '--max-steps', str(step + 2)]) == 0
    assert json.loads((checkpoint_dir(out) / 'trainer_state.json').read_text())['step'] == step + 2
