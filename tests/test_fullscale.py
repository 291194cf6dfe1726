"""The full-scale path rehearsed on a CPU (issue 14): NSD at its real geometry, IP-Adapter Plus targets (16 x 768), the
paper preset's widths and patch size at a cut depth, two processes, Stable Diffusion at 512 px and the metric networks,
driven by the commands a GPU user types; and those commands' bad inputs. The inputs are the session fixture
`fullscale` (tests/conftest.py); the trained run is shared by the tests of this module."""
import json, os, shutil, subprocess, sys
from pathlib import Path

import numpy as np
import pytest

from mindlink.cli import main
from mindlink.utils import load_json

# The paper preset: width 768, patch 10, 16 tokens of 768. Depth cut to one layer of each kind, and a batch that the
# rehearsal's 3 x 8 training images fill (3 optimizer steps per epoch), so that a CPU trains it in seconds.
PAPER = ['--preset', 'paper', '--set', 'enc_layers=1', '--set', 'perceiver_layers=1', '--set', 'dec_layers=1',
         '--set', 'n_subjects=3', '--set', 'batch_size=8', '--set', 'epochs=2', '--set', 'warmup_epochs=1',
         '--set', 'eval_every=1', '--set', 'ckpt_every=1', '--set', 'log_every=1', '--set', 'num_workers=0']
SUBJECTS = ['--subjects', '1', '2', '5']   # pretrained on subjects 1, 2, 5; subject 7 is the new one (Table 3)


def run_cli(capsys, *argv, status=0):
    "`mindlink ARGV` in this process: the exit status must be `status`; returns what it printed (stdout + stderr)."
    got = main([str(a) for a in argv])
    out = capsys.readouterr()
    assert got == status, out.out[-2000:] + out.err[-2000:]
    if status == 2: assert out.err.strip().splitlines()[-1].startswith(f'mindlink {argv[0]}: error:') and 'Traceback' not in out.err
    return out.out + out.err


def linked_copy(root, dest):
    "A copy of an NSD folder made of symbolic links (no cache), cheap to alter."
    shutil.copytree(root, dest, symlinks=True, copy_function=os.symlink, ignore=shutil.ignore_patterns('mindlink_cache'))
    return dest


@pytest.fixture(scope='module')
def run(fullscale, tmp_path_factory):
    "`mindlink train` against IP-Adapter Plus targets, the paper preset at a cut depth, on subjects 1, 2, 5."
    out = tmp_path_factory.mktemp('fullscale_run') / 'run'
    assert main(['train', '--data', str(fullscale['root']), '--out', str(out), '--embedder', f"ip-adapter-plus:{fullscale['ip_adapter']}",
                 *PAPER, *SUBJECTS]) == 0
    return out


def test_data_check(fullscale, tmp_path, capsys):
    root = fullscale['root']
    out = run_cli(capsys, 'data', 'check', root, '--sessions', '1', '--out', tmp_path / 'check')
    assert 'complete' in out and 'shared982: 4 test images' in out
    assert (tmp_path / 'check' / 'check.md').exists() and (tmp_path / 'check' / 'fetch.txt').read_text() == ''
    # against the published counts: the 39 missing sessions of each subject, named, to fetch
    err = run_cli(capsys, 'data', 'check', root, '--out', tmp_path / 'full', status=2)
    assert 'subj01/func1pt8mm/betas_fithrf_GLMdenoise_RR/betas_session02.nii.gz' in err
    fetch = (tmp_path / 'full' / 'fetch.txt').read_text().splitlines()
    assert len(fetch) == 4 * 39 and fetch[0].startswith('aws s3 cp s3://natural-scenes-dataset/nsddata_betas/ppdata/subj01/')


def test_missing_session_is_named(fullscale, tmp_path, capsys):
    "An NSD folder whose subject 1 has session 2 but not session 1: every command names the missing file."
    bad = linked_copy(fullscale['root'], tmp_path / 'nsd')
    d = bad / 'nsddata_betas/ppdata/subj01/func1pt8mm/betas_fithrf_GLMdenoise_RR'
    (d / 'betas_session01.nii.gz').rename(d / 'betas_session02.nii.gz')
    err = run_cli(capsys, 'data', 'check', bad, '--sessions', '2', status=2)
    assert 'betas_session01.nii.gz: betas session 01 missing' in err
    err = run_cli(capsys, 'train', '--data', bad, '--out', tmp_path / 'r', *PAPER, *SUBJECTS, status=2)
    assert 'subj01/func1pt8mm/betas_fithrf_GLMdenoise_RR/betas_session01.nii.gz: file not found' in err


def test_train(run, fullscale):
    rec = load_json(run / 'embedder' / 'config.json')
    assert rec['kind'] == 'ip-adapter-plus' and (rec['n_tokens'], rec['dim']) == (16, 768)
    assert set(rec['files']) == {'models/ip-adapter-plus_sd15.safetensors', 'models/image_encoder/config.json',
                                 'models/image_encoder/model.safetensors'}
    data = load_json(run / 'data.json')
    assert data['test_split'] == 'shared982' and data['subjects'] == [1, 2, 5] and data['n_test'] == 4
    assert data['embedder'] == {'kind': 'ip-adapter-plus', 'identity': rec['identity']}
    cfg = load_json(run / 'config.json')
    assert (cfg['d_model'], cfg['patch'], cfg['n_tokens'], cfg['token_dim']) == (768, 10, 16, 768)
    state = load_json(run / 'checkpoints' / (run / 'checkpoints' / 'latest').read_text() / 'trainer_state.json')
    assert state['step'] == 6 and state['world_size'] == 1


def test_train_two_processes(run, fullscale, tmp_path):
    "`torchrun --nproc_per_node 2 -m mindlink.cli train ...`: two CPU processes train as one (the caches are the first run's)."
    out = tmp_path / 'run2'
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', '29531',
                        '-m', 'mindlink.cli', 'train', '--data', str(fullscale['root']), '--out', str(out), '--device', 'cpu',
                        '--embedder', f"ip-adapter-plus:{fullscale['ip_adapter']}", *PAPER, *SUBJECTS],
                       capture_output=True, text=True, timeout=600, env={**os.environ, 'MINDLINK_NO_PROGRESS': '1', 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'memory: micro-batch 4 x 1 accumulation step(s) x 2 process(es) = batch 8 (on the CPU)' in r.stdout   # said once, at the start
    state = load_json(out / 'checkpoints' / (out / 'checkpoints' / 'latest').read_text() / 'trainer_state.json')
    assert state['world_size'] == 2 and state['micro_batch'] == 4 and state['step'] == 6
    digests = state['weights_sha1_per_rank']
    assert len(digests) == 2 and digests[0] == digests[1]                 # both ranks hold the same weights
    assert load_json(out / 'embedder' / 'config.json')['identity'] == load_json(run / 'embedder' / 'config.json')['identity']


def test_evaluate(run, fullscale, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv('MINDLINK_WEIGHTS', str(fullscale['metric_weights']))   # the metric networks, where a GPU user puts them
    run_cli(capsys, 'evaluate', '--run', run, '--data', fullscale['root'], '--sd', fullscale['sd'], '--steps', '2', '--out', tmp_path / 'ev')
    m = load_json(tmp_path / 'ev' / 'metrics.json')
    assert set(m['per_subject']) == {'subj01', 'subj02', 'subj05'} and m['retrieval_chance'] == pytest.approx(1 / 4)
    for k in ('PixCorr', 'SSIM', 'AlexNet(2)', 'AlexNet(5)', 'Inception', 'CLIP', 'EffNet-B', 'SwAV'):
        assert np.isfinite(m['per_subject']['subj01'][k]), k
    assert (tmp_path / 'ev' / 'metrics.md').exists()
    # IP-Adapter Plus tokens need Stable Diffusion to become images
    err = run_cli(capsys, 'evaluate', '--run', run, '--data', fullscale['root'], '--out', tmp_path / 'ev2', status=2)
    assert 'IP-Adapter Plus tokens from' in err and '--sd' in err


def test_reconstruct(run, fullscale, tmp_path, capsys):
    run_cli(capsys, 'reconstruct', '--run', run, '--data', fullscale['root'], '--out', tmp_path / 'rec', '--sd', fullscale['sd'],
            '--steps', '2', '--n', '2')
    z = np.load(tmp_path / 'rec' / 'reconstructions.npz')
    assert z['images'].shape == (2, 512, 512, 3) and z['images'].dtype == np.uint8
    assert (tmp_path / 'rec' / 'reconstructions.png').exists()


def test_adapt(run, fullscale, tmp_path, capsys):
    import pandas as pd
    out = tmp_path / 'ad'
    run_cli(capsys, 'adapt', '--run', run, '--data', fullscale['root'], '--out', out, '--subject', '7', '--sizes', '8', '--seeds', '0',
            '--steps', '2', '--set', 'batch_size=4', '--sd', fullscale['sd'], '--sd-steps', '2')
    df = pd.read_csv(out / 'adaptation.csv')
    assert sorted(df['mode']) == ['finetune', 'scratch', 'zero-shot'] and (df[df['mode'] != 'zero-shot'].steps == 2).all()
    assert (out / 'adaptation.md').exists() and (out / 'adaptation.png').exists()


def _adapter_with_token_width(src, dest, width):
    "A copy of an IP-Adapter folder whose resampler emits tokens of another width (a file for another SD version)."
    import torch
    from mindlink.utils import load_safetensors, save_safetensors
    shutil.copytree(src, dest)
    f = dest / 'models' / 'ip-adapter-plus_sd15.safetensors'
    sd, _ = load_safetensors(f)
    hidden = sd['image_proj.proj_out.weight'].shape[1]
    sd.update({'image_proj.proj_out.weight': torch.zeros(width, hidden, dtype=torch.float16),
               'image_proj.proj_out.bias': torch.zeros(width, dtype=torch.float16),
               'image_proj.norm_out.weight': torch.ones(width, dtype=torch.float16),
               'image_proj.norm_out.bias': torch.zeros(width, dtype=torch.float16)})
    save_safetensors(sd, f)
    return dest


def test_bad_weights_are_named(run, fullscale, tmp_path, capsys):
    root, argv = fullscale['root'], [*PAPER, *SUBJECTS]
    # an IP-Adapter folder without its CLIP image encoder
    no_enc = tmp_path / 'no_encoder'; shutil.copytree(fullscale['ip_adapter'], no_enc); shutil.rmtree(no_enc / 'models' / 'image_encoder')
    err = run_cli(capsys, 'train', '--data', root, '--out', tmp_path / 'r1', '--embedder', f'ip-adapter-plus:{no_enc}', *argv, status=2)
    assert f"{no_enc / 'models' / 'image_encoder'}: CLIP image encoder folder not found" in err
    # an adapter file whose tokens are 16 x 1024, not 16 x 768
    wide = _adapter_with_token_width(fullscale['ip_adapter'], tmp_path / 'wide', 1024)
    err = run_cli(capsys, 'train', '--data', root, '--out', tmp_path / 'r2', '--embedder', f'ip-adapter-plus:{wide}', *argv, status=2)
    assert f"{wide / 'models' / 'ip-adapter-plus_sd15.safetensors'}: 16 tokens of width 1024" in err and 'token_dim=768' in err
    err = run_cli(capsys, 'reconstruct', '--run', run, '--data', root, '--out', tmp_path / 'rec', '--sd', fullscale['sd'],
                  '--ip-adapter', wide, '--steps', '2', '--n', '2', status=2)
    assert 'ip-adapter-plus_sd15.safetensors: not the IP-Adapter Plus the tokens were made with' in err
