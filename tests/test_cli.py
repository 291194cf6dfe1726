"The `mindlink` command end to end: every subcommand's happy path and one bad input each (nbs/14_cli.ipynb)."
import json, os, subprocess, sys
from pathlib import Path

import pytest

from mindlink.cli import main
from mindlink.mininsd import TINY_MINI_NSD, make_mini_nsd

TINY = ['--preset', 'tiny', '--set', 'epochs=2', '--set', 'warmup_epochs=1', '--set', 'batch_size=16',
        '--set', 'eval_every=1', '--set', 'ckpt_every=1']


def fails(capsys, argv, *expected):
    "Run `main(argv)`: it must return status 2 and print one error line naming what is wrong, no traceback."
    status = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.strip().splitlines()[-1].startswith(f'mindlink {argv[0]}: error:') and 'Traceback' not in err   # after any progress bars
    for e in expected: assert e in err, err
    return err


@pytest.fixture(scope='module')
def root(tmp_path_factory):
    "A MiniNSD of the tests' size, private to this module (runs write their caches into it)."
    return make_mini_nsd(tmp_path_factory.mktemp('cli') / 'mini', seed=0, show_progress=False, **TINY_MINI_NSD)


@pytest.fixture(scope='module')
def run(root, tmp_path_factory):
    "A tiny model trained on subjects 1-4 with `mindlink train`."
    out = tmp_path_factory.mktemp('cli') / 'run'
    assert main(['train', '--data', str(root), '--out', str(out), *TINY, '--subjects', '1', '2', '3', '4']) == 0
    return out


def test_entry_point():
    "The console script is installed and answers --help without importing the heavy modules."
    r = subprocess.run([str(Path(sys.executable).parent / 'mindlink'), '--help'], capture_output=True, text=True)
    assert r.returncode == 0 and 'demo' in r.stdout and 'bench' in r.stdout
    r = subprocess.run([sys.executable, '-m', 'mindlink.cli', 'data', 'info', '/nonexistent'], capture_output=True, text=True)
    assert r.returncode == 2 and 'folder not found' in r.stderr and 'Traceback' not in r.stderr


def _cli_stderr(argv, terminal: bool) -> str:
    "What `mindlink ARGV` (a subprocess) writes to stderr when that is a terminal (a pseudo-terminal here) or a pipe."
    env = {k: v for k, v in os.environ.items() if k != 'MINDLINK_NO_PROGRESS'}
    cmd = [sys.executable, '-m', 'mindlink.cli', *map(str, argv)]
    if not terminal: return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=True).stderr
    import fcntl, pty, struct, termios
    main_fd, sub_fd = pty.openpty()
    fcntl.ioctl(sub_fd, termios.TIOCSWINSZ, struct.pack('HHHH', 24, 100, 0, 0))   # 24 rows, 100 columns
    p = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=sub_fd)
    os.close(sub_fd)
    out = b''
    while True:
        try: chunk = os.read(main_fd, 1 << 16)
        except OSError: break            # EIO: the child closed the terminal
        if not chunk: break
        out += chunk
    os.close(main_fd)
    assert p.wait(timeout=600) == 0, out.decode(errors='replace')
    return out.decode(errors='replace')


def test_progress_bars_on_a_terminal_only(tmp_path):
    "A person at a terminal sees the bars; a CI log (a pipe) gets none, with no setting needed either way."
    args = ['data', 'mini-nsd', '--tiny', '--set', 'n_train=20', '--out']
    on_terminal = _cli_stderr([*args, tmp_path / 'a'], terminal=True)
    assert 'MiniNSD subjects' in on_terminal and '100%|' in on_terminal, on_terminal
    piped = _cli_stderr([*args, tmp_path / 'b'], terminal=False)
    assert 'MiniNSD subjects' not in piped and '%|' not in piped, piped


def test_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as e: main(['bench', 'tpu'])
    assert e.value.code == 2 and "invalid choice: 'tpu'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e: main([])
    assert e.value.code == 2


def test_data(tmp_path, capsys):
    assert main(['data', 'mini-nsd', '--out', str(tmp_path / 'm'), '--tiny', '--set', 'n_train=20']) == 0
    assert (tmp_path / 'm' / 'nsddata' / 'experiments' / 'nsd' / 'nsd_expdesign.mat').exists()
    assert main(['data', 'info', str(tmp_path / 'm')]) == 0
    assert 'subj05: 20 training images' in capsys.readouterr().out
    fails(capsys, ['data', 'info', tmp_path / 'nowhere'], 'folder not found')
    # asking for other settings where a MiniNSD already is: refused unless --overwrite
    fails(capsys, ['data', 'mini-nsd', '--out', tmp_path / 'm', '--tiny', '--set', 'n_train=30'], 'other settings')


def test_train(run, tmp_path, capsys, root):
    assert (run / 'config.json').exists() and (run / 'log.csv').exists() and (run / 'embedder' / 'config.json').exists()
    assert json.loads((run / 'config.json').read_text())['epochs'] == 2
    fails(capsys, ['train', '--data', root, '--out', tmp_path / 'r', '--set', 'epoch=3'], "unknown MindLinkConfig field(s) 'epoch' (did you mean 'epochs'?)")
    fails(capsys, ['train', '--data', tmp_path / 'nowhere', '--out', tmp_path / 'r'], 'folder not found')
    (tmp_path / 'bad.yaml').write_text('warmup_epoch: 3\n')
    fails(capsys, ['train', '--data', root, '--out', tmp_path / 'r', '--config', tmp_path / 'bad.yaml'], 'bad.yaml', 'warmup_epoch')


def test_evaluate(run, root, tmp_path, capsys):
    assert main(['evaluate', '--run', str(run), '--data', str(root), '--out', str(tmp_path / 'ev')]) == 0
    m = json.loads((tmp_path / 'ev' / 'metrics.json').read_text())
    assert set(m['per_subject']) == {'subj01', 'subj02', 'subj03', 'subj04'}
    assert m['retrieval_chance'] == pytest.approx(1 / 12) and 0 <= m['two_way_identification'] <= 1
    assert (tmp_path / 'ev' / 'metrics.csv').exists() and (tmp_path / 'ev' / 'metrics.md').exists()
    fails(capsys, ['evaluate', '--run', tmp_path / 'nothing', '--data', root], 'not a training run')
    fails(capsys, ['evaluate', '--run', run, '--data', root, '--subjects', '9'], '9')


def test_reconstruct(run, root, tmp_path, capsys):
    import numpy as np
    assert main(['reconstruct', '--run', str(run), '--data', str(root), '--out', str(tmp_path / 'rec'), '--subject', '2', '--n', '4']) == 0
    z = np.load(tmp_path / 'rec' / 'reconstructions.npz')
    assert z['images'].shape == (4, 32, 32, 3) and z['images'].dtype == np.uint8 and len(z['image_ids']) == 4
    assert (tmp_path / 'rec' / 'reconstructions.png').exists()
    # Stable Diffusion from a folder that is not there: a clear error that says what to download
    fails(capsys, ['reconstruct', '--run', run, '--data', root, '--out', tmp_path / 'sd', '--sd', tmp_path / 'no_sd'], 'no_sd')


def test_adapt(run, root, tmp_path, capsys):
    import pandas as pd
    out = tmp_path / 'ad'
    assert main(['adapt', '--run', str(run), '--data', str(root), '--out', str(out), '--sizes', '16', '--seeds', '0',
                 '--steps', '2', '--set', 'batch_size=8']) == 0
    df = pd.read_csv(out / 'adaptation.csv')
    assert sorted(df['mode']) == ['finetune', 'scratch', 'zero-shot']
    assert (df[df['mode'] != 'zero-shot'].steps == 2).all()            # the same budget for both arms
    assert (out / 'adaptation.png').exists() and (out / 'adaptation.md').exists()
    fails(capsys, ['adapt', '--run', run, '--data', root, '--out', out, '--sizes', '100000', '--seeds', '0'], 'training images')


def test_bench(tmp_path, capsys):
    assert main(['bench', 'metrics', '--set', 'n=8', '--set', 'size=32', '--set', 'sizes=[8]', '--set', 'nets=[]',
                 '--json', str(tmp_path / 'b.json')]) == 0
    assert 'bench_metrics' in json.loads((tmp_path / 'b.json').read_text())
    fails(capsys, ['bench', 'metrics', '--set', 'nope=1'], "no benchmark takes ['nope']")
    fails(capsys, ['bench', 'data', '--only', 'bench_nothing'], 'bench_nothing')



def test_bench_gpu_smoke_through_the_gpu_script(tmp_path):
    "The GPU check's exact command, at tiny sizes on this machine: scripts/gpu_check.sh --smoke (nbs/13a_benchmarks.ipynb)."
    script = Path(__file__).resolve().parents[1] / 'scripts' / 'gpu_check.sh'
    r = subprocess.run(['bash', str(script), '--smoke', '--out', str(tmp_path)], capture_output=True, text=True, timeout=600,
                       env={**__import__('os').environ, 'PYTHON': sys.executable, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    res = json.loads((tmp_path / 'bench_gpu.json').read_text())
    sec = res['sections']
    assert res['smoke'] and set(sec) == {'device', 'step (eager)', 'loader', 'reconstruction', 'cuda tests', 'step (compiled)'}
    assert not [k for k, v in sec.items() if 'error' in v or 'not_run' in v]
    for k in ('step (eager)', 'step (compiled)'): assert sec[k]['samples_per_s'] > 0 and sec[k]['achieved_tflops'] > 0
    assert sec['step (compiled)']['compile'] == 'aot_eager'
    assert {row['path'] for row in sec['loader']['rows']} == {'host, 0 workers', 'host, 1 worker', 'preloaded on cpu'}
    assert all(row['vs_fastest_step'] > 0 for row in sec['loader']['rows'])
    assert [row['batch_size'] for row in sec['reconstruction']['rows']] == [1, 2]
    t = sec['cuda tests']
    assert t['returncode'] == 0 and t['failed'] == t['errors'] == 0 and t['skipped'] == len(t['cases']) >= 6   # no GPU here
    log = (tmp_path / 'bench_gpu.log').read_text()
    assert 'samples/s' in log and 'results written to' in log

def test_demo(tmp_path, capsys):
    out = tmp_path / 'demo'
    assert main(['demo', '--out', str(out), '--quick']) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed                                  # the folder as the user named it
    m = json.loads((out / 'metrics.json').read_text())
    assert {'retrieval_top1', 'retrieval_chance', 'two_way_identification'} <= set(m)
    assert m['retrieval_chance'] == pytest.approx(1 / m['n_test'])
    for f in ('metrics.csv', 'metrics.md', 'reconstructions.png', 'tsne.png', 'loss_curves.png'): assert (out / f).exists(), f
    # the flattened-voxel baselines beside MindLink, with the same metrics, in every results file
    from mindlink.baselines import BASELINES
    import pandas as pd
    assert set(m['baselines']) == set(BASELINES)
    for b in m['baselines'].values():
        assert {'retrieval_top1', 'retrieval_chance', 'two_way_identification', 'PixCorr', 'SSIM'} <= set(b) and b['params'] > 0
        assert set(b['per_subject']) == set(m['per_subject']) and 0 <= b['retrieval_top1'] <= 1
    dec = pd.read_csv(out / 'metrics_decoding.csv')
    assert dec.groupby('method').size().to_dict() == {'MindLink (one model)': 4, **{v: 4 for v in BASELINES.values()}}
    md = (out / 'metrics.md').read_text()
    assert all(v in md for v in BASELINES.values()) and 'baselines (flattened voxels)' in md
    fails(capsys, ['demo', '--out', tmp_path / 'd2', '--quick', '--set', 'n_tokens=15'], 'n_tokens')


def test_experiments(tmp_path, capsys):
    out = tmp_path / 'exp'
    assert main(['experiments', '--out', str(out), '--work', str(tmp_path / 'work'), '--quick', '--jobs', '2']) == 0  # two worker processes
    for f in ('table12.csv', 'probe.csv', 'table3.csv', 'ceiling.csv', 'fig2.npz', 'fig3.npz', 'experiments.json'): assert (out / f).exists(), f
    import pandas as pd
    t = pd.read_csv(out / 'table12.csv')
    # Table 3 with the baselines fitted on the same images of the new subject, scored by the same code; no machine paths
    t3 = pd.read_csv(out / 'table3.csv')
    assert set(t3['mode']) == {'zero-shot', 'finetune', 'scratch', 'ridge', 'mlp', 'shared-mlp'}
    assert (t3[t3['mode'] != 'zero-shot'].groupby('mode').n_train.apply(set) == {12, 24}).all() and t3.PixCorr.notna().all()
    assert not any(str(tmp_path) in open(out / f).read() for f in ('table12.csv', 'table3.csv', 'probe.csv', 'ceiling.csv'))
    c = pd.read_csv(out / 'ceiling.csv')
    assert list(c.subject) == [1, 2, 3, 4, 5] and (c.ceiling >= 0).all()
    meta = json.loads((out / 'experiments.json').read_text())
    assert meta['world'] == 'default' and meta['config']['mixup'] == 1.0 and meta['baseline_options']['mlp']['mixup'] == 1.0
    from mindlink.baselines import BASELINES, BASELINE_GROUP
    assert set(t.method) == {'MindLink', 'w/o L_subj', 'w/o cross-attention', 'MindLink, 4× steps', 'MindLink, one model per subject',
                             'MindLink, one model per subject, same steps', *BASELINES.values()}
    # the baselines' rows: their own group, every subject, scored like MindLink (the ridge once: it is deterministic)
    bl = t[t.group == BASELINE_GROUP]
    assert set(bl.method) == set(BASELINES.values()) and (bl.groupby('method').subject.nunique() == 4).all()
    assert bl[bl.method == BASELINES['ridge']].seed.nunique() == 1 and (bl[bl.method == BASELINES['ridge']].steps == 0).all()
    assert bl.retrieval_top1.between(0, 1).all() and bl.two_way_identification.notna().all() and (bl.params > 0).all()
    # per subject, the same-steps arm takes as many optimizer steps as the shared model
    steps = t.groupby('method').steps.unique()
    assert len(steps['MindLink']) == 1 and (steps['MindLink, one model per subject, same steps'] >= steps['MindLink'][0]).all()
    assert (steps['MindLink, one model per subject'] < steps['MindLink'][0]).all()
    # the shared model with the per-subject models' total compute: four times its steps
    assert list(steps['MindLink, 4× steps']) == [4 * steps['MindLink'][0]]
    # a second call reuses the finished runs in --work: same scores without retraining
    assert main(['experiments', '--out', str(tmp_path / 'exp2'), '--work', str(tmp_path / 'work'), '--quick']) == 0
    t2 = pd.read_csv(tmp_path / 'exp2' / 'table12.csv')
    keys = ['method', 'seed', 'subject', 'steps', 'retrieval_top1', 'two_way_identification', 'PixCorr']
    pd.testing.assert_frame_equal(t[keys], t2[keys])
    a3, b3 = (pd.read_csv(tmp_path / d / 'table3.csv') for d in ('exp', 'exp2'))
    pd.testing.assert_frame_equal(a3[['mode', 'n_train', 'seed', 'steps', 'retrieval_top1']], b3[['mode', 'n_train', 'seed', 'steps', 'retrieval_top1']])
    fails(capsys, ['experiments', '--out', tmp_path / 'e2', '--quick', '--sizes', '5000'], '5000')
    fails(capsys, ['experiments', '--out', tmp_path / 'e2', '--quick', '--set', 'mixup=-1'], 'mixup=-1.0 must be >= 0')
    fails(capsys, ['experiments', '--out', tmp_path / 'e2', '--quick', '--seeds', '0', '0'], '[0] given more than once')


def test_experiments_in_the_nsd_world_with_a_variant(tmp_path):
    "`--snr nsd` trains on the NSD-noise world, `--set` changes the config; both are recorded with the full config and the command."
    out = tmp_path / 'exp'
    assert main(['experiments', '--out', str(out), '--work', str(tmp_path / 'work'), '--quick', '--snr', 'nsd', '--set', 'mixup=0']) == 0
    meta = json.loads((out / 'experiments.json').read_text())
    assert meta['world'] == 'nsd' and meta['data']['snr'] == 'nsd' and meta['config']['mixup'] == 0.0
    assert '--snr nsd' in meta['command'] and '--set mixup=0' in meta['command'] and meta['baseline_options']['mlp']['mixup'] == 0.0
    params = json.loads((tmp_path / 'work' / 'data' / 'mininsd' / 'params.json').read_text())
    assert params['snr'] == 'nsd' and params['calibration']['noise_scale'] > 1


def test_experiments_recipe(tmp_path, capsys):
    "chapter 9's mixup study (`--recipe`): two arms at the tests' size, scored as the demo scores, with the training-image retrieval."
    import json, pandas as pd
    from mindlink.experiments import RECIPE_ARMS
    out, work = tmp_path / 'recipe', tmp_path / 'work'
    assert main(['experiments', '--recipe', '--out', str(out), '--work', str(work), '--quick', '--seeds', '0']) == 0
    r, meta = pd.read_csv(out / 'runs.csv'), json.loads((out / 'recipe.json').read_text())
    arms = list(RECIPE_ARMS)[:2]
    assert sorted(r.arm.unique()) == sorted(arms) and set(meta['arms']) == set(arms) and (r.groupby('arm').subject.nunique() == 4).all()
    assert r[['retrieval_top1', 'train_top1', 'PixCorr']].apply(lambda c: c.between(-1, 1)).all().all() and r.train_top1.notna().all()
    # each run folder trained the arm's config: the preset mixes, the arm without mixup does not
    mixes = sorted(json.loads(p.read_text())['mixup'] for p in (work / 'runs').glob('*/config.json'))
    assert mixes == sorted([0.0, RECIPE_ARMS[arms[0]].get('mixup', 1.0)])
    # a second call finds the runs finished: the same scores without training
    assert main(['experiments', '--recipe', '--out', str(tmp_path / 'recipe2'), '--work', str(work), '--quick', '--seeds', '0']) == 0
    keys = ['arm', 'seed', 'subject', 'steps', 'retrieval_top1', 'train_top1', 'PixCorr']
    pd.testing.assert_frame_equal(r[keys], pd.read_csv(tmp_path / 'recipe2' / 'runs.csv')[keys])
    fails(capsys, ['experiments', '--recipe', '--learning', '--out', tmp_path / 'r3', '--quick'], 'choose one')
