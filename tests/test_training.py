"Training (nbs/09_training.ipynb): exact resume (also after SIGTERM), two CPU processes training as one, bad input, fine-tuning helpers."
import json, os, shutil, signal, subprocess, sys, textwrap, time
from pathlib import Path

import pytest
import torch

from mindlink.model import MindLinkConfig
from mindlink.bench import bench_train
from mindlink.model import as_config
from mindlink.runs import load_checkpoint, load_weights, torch_load, verify_checkpoint
from mindlink.training import predict_tokens, train
from mindlink.utils import MindLinkError, load_safetensors

CFG = dict(batch_size=16, epochs=3, warmup_epochs=1, lr=2e-3, log_every=2, eval_every=1, ckpt_every=1, dropout=0.1)
TINY_P = MindLinkConfig.tiny().patch


@pytest.fixture(scope='module')
def cfg(): return MindLinkConfig.tiny(**CFG)


@pytest.fixture(scope='module')
def full_run(mini_nsd_root, cfg, tmp_path_factory):
    "An uninterrupted reference run."
    out = tmp_path_factory.mktemp('full')
    return train(cfg, mini_nsd_root, out, progress_bar=False).summary, out


def _weights(run_dir):
    t, _ = load_safetensors(Path(run_dir) / 'checkpoints' / (Path(run_dir) / 'checkpoints' / 'latest').read_text() / 'model.safetensors')
    return t


def _same(a, b): return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_is_exact(mini_nsd_root, cfg, full_run, tmp_path):
    summary, full = full_run
    K = summary['total_steps']
    assert summary['step'] == K and K >= 6
    train(cfg, mini_nsd_root, tmp_path, max_steps=K // 2 + 1, progress_bar=False)   # stops mid-epoch
    assert verify_checkpoint(tmp_path)['step'] == K // 2 + 1
    assert not _same(_weights(tmp_path), _weights(full))
    train(cfg, mini_nsd_root, tmp_path, resume=True, progress_bar=False)
    assert _same(_weights(tmp_path), _weights(full))                                  # bit for bit
    assert _same(torch_load(load_checkpoint(tmp_path).path / 'optimizer.pt')['state'][0],
                 torch_load(load_checkpoint(full).path / 'optimizer.pt')['state'][0])


def test_sigterm_saves_then_resume_is_exact(mini_nsd_root, cfg, full_run, tmp_path):
    _, full = full_run
    code = textwrap.dedent(f"""
        import torch; torch.set_num_threads(1)
        from mindlink.model import MindLinkConfig
        from mindlink.training import train
        train(MindLinkConfig.tiny(**{CFG!r}), {str(mini_nsd_root)!r}, {str(tmp_path)!r}, progress_bar=False)
    """)
    p = subprocess.Popen([sys.executable, '-c', code], env={**os.environ, 'MINDLINK_NO_PROGRESS': '1'})
    log = tmp_path / 'log.csv'
    t0 = time.time()
    while time.time() - t0 < 60 and not (log.exists() and len(log.read_text().splitlines()) >= 3): time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    assert p.wait(60) == 128 + signal.SIGTERM                                           # saved, then exited 143
    state = verify_checkpoint(tmp_path)
    assert 0 < state['step'] < load_checkpoint(full).state['step']
    train(cfg, mini_nsd_root, tmp_path, resume=True, progress_bar=False)
    assert _same(_weights(tmp_path), _weights(full))


def test_two_processes_one_preparation(mini_nsd_root, full_run, tmp_path):
    """`torchrun --nproc_per_node 2 -m mindlink.cli train --overwrite` on a data root whose cache is empty, into a run
    folder that holds another run's checkpoints, with nothing prepared here: the main process builds the patch store,
    fits the embedder and embeds the stimuli, the other only reads them; both ranks end with identical weights."""
    from mindlink.mininsd import TINY_MINI_NSD, make_mini_nsd
    root = make_mini_nsd(tmp_path / 'mini', seed=0, show_progress=False, **TINY_MINI_NSD)
    assert not (root / 'mindlink_cache').exists()
    out = tmp_path / 'run'; shutil.copytree(full_run[1], out)                       # an existing run, to be overwritten
    argv = ['train', '--data', str(root), '--out', str(out), '--preset', 'tiny', '--overwrite', '--device', 'cpu', '--record-batches',
            *[x for k, v in CFG.items() for x in ('--set', f'{k}={v}')]]
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', '29517',
                        '-m', 'mindlink.cli', *argv], capture_output=True, text=True, timeout=300,
                       env={**os.environ, 'MINDLINK_NO_PROGRESS': '1', 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, r.stderr[-3000:]
    state = verify_checkpoint(out)
    assert state['world_size'] == 2 and state['micro_batch'] == CFG['batch_size'] // 2
    digests = state['weights_sha1_per_rank']
    assert len(digests) == 2 and digests[0] == digests[1]                           # identical weights on both ranks
    # one preparation: one store (complete, no partial files), one embedder fit, one embedding file
    cache = root / 'mindlink_cache'
    names = sorted(p.name for p in cache.iterdir())
    assert len(names) == 3 and names[0].startswith('embedder_regionpca_n16_d64_subj1-2-3-4_') and names[1:] == ['embeddings', f'patches_p{TINY_P}']
    assert not list(cache.rglob('*.partial.npy')) and not list(cache.rglob('progress.json')) and len(list((cache / 'embeddings').rglob('*.safetensors'))) == 1
    seen = [json.loads((out / f'seen_rank{k}.json').read_text()) for k in range(2)]
    B = CFG['batch_size']
    for epoch in range(CFG['epochs']):
        s0, s1 = ({tuple(x[1:]) for x in s if x[0] == epoch} for s in seen)
        assert len(s0) == len(s1) == state['total_steps'] // CFG['epochs'] * B // 2 and not s0 & s1   # half a global batch each step, disjoint


def test_bad_config_and_checkpoints(mini_nsd_root, cfg, full_run, tmp_path):
    _, full = full_run
    with pytest.raises(MindLinkError, match=r"unknown MindLinkConfig field\(s\) 'warmup_epoch' \(did you mean 'warmup_epochs'\?\)"):
        as_config({**cfg.to_dict(), 'warmup_epoch': 5})
    (tmp_path / 'c.json').write_text(json.dumps({'lr': 1e-3, 'bogus': 1}))
    with pytest.raises(MindLinkError, match=r"c\.json.*bogus"): train(tmp_path / 'c.json', mini_nsd_root, tmp_path / 'x')
    # resuming with another config
    run = tmp_path / 'other'; shutil.copytree(full, run)
    with pytest.raises(MindLinkError, match=r"different config.*'lr'"):
        train(cfg.replace(lr=1e-2), mini_nsd_root, run, resume=True, progress_bar=False)
    with pytest.raises(MindLinkError, match='weights do not fit'): load_weights(type(load_checkpoint(full).model)(load_checkpoint(full).config.replace(d_model=32)), full)
    # truncated files
    ck = load_checkpoint(run).path
    for name in ('model.safetensors', 'optimizer.pt'):
        bad = tmp_path / f'bad_{name}'; shutil.copytree(ck, bad)
        (bad / name).write_bytes((bad / name).read_bytes()[:-200])
        with pytest.raises(MindLinkError, match=f'{name}: truncated'): load_checkpoint(bad)
    bad = tmp_path / 'bad_opt'; shutil.copytree(ck, bad)
    (bad / 'optimizer.pt').write_bytes(b'PK\x03\x04garbage')
    with pytest.raises(MindLinkError, match='not a readable checkpoint file'): torch_load(bad / 'optimizer.pt')
    with pytest.raises(MindLinkError, match='no checkpoint here'): load_checkpoint(tmp_path)


def test_finetune_new_subject_and_predict(mini_nsd_root, cfg, full_run, tmp_path):
    summary, full = full_run
    ft = cfg.replace(n_subjects=1, epochs=2, warmup_epochs=0, batch_size=8)
    s = train(ft, mini_nsd_root, tmp_path, subjects=[5], n_train=16, init_from=full / 'checkpoints', progress_bar=False).summary
    assert s['step'] == 2 * 2 and (tmp_path / 'embedder' / 'config.json').exists()
    ck = load_checkpoint(tmp_path)
    assert ck.config.n_subjects == 1 and ck.state['subjects'] == [5]
    # predict_tokens: a store's subject at given ids, in the order asked
    store = Path(mini_nsd_root) / 'mindlink_cache' / f'patches_p{cfg.patch}'
    from mindlink.patching import PatchStore
    ids = PatchStore(store).image_ids(5)[:6]
    assert predict_tokens(ck.model, store, subject=5, image_ids=ids, batch_size=4).shape == (6, cfg.n_tokens, cfg.token_dim)
    # one sample per forward pass, so that kernels chosen by batch size cannot blur the comparison
    p = predict_tokens(ck.model, store, subject=5, image_ids=ids, batch_size=1)
    q = predict_tokens(ck.model, store, subject=5, image_ids=ids[::-1].copy(), batch_size=1)
    assert not torch.equal(p[0], p[1]) and torch.equal(p, q.flip(0))


def test_bench_train_tiny():
    r = bench_train('tiny', batch_size=4, n_patches=16, steps=2, warmup=1)
    assert r['samples_per_s'] > 0 and r['achieved_tflops'] > 0 and r['mfu'] is None and r['peak_mem_gb'] > 0
    with pytest.raises(MindLinkError, match='preset'): bench_train('huge')


def test_trainer_fits_micro_batch_to_free_memory(mini_nsd_root, monkeypatch):
    "The trainer's cut of a step on a GPU, with the free memory mocked: the micro-batch follows the memory, accumulation keeps B."
    from types import SimpleNamespace
    from mindlink import precision, training
    from mindlink.model import MindLink
    from mindlink.prepare import prepare_data
    cfg = MindLinkConfig.tiny(batch_size=64)
    data = prepare_data(cfg, mini_nsd_root)
    cfg = cfg.with_grid(data.coords)
    mib = 2**20
    est = {False: dict(per_sample=10 * mib, fixed=0), True: dict(per_sample=2 * mib, fixed=0)}
    monkeypatch.setattr(precision, 'activation_estimate', lambda c, L, dtype=None: est[c.grad_checkpointing])
    trainer = SimpleNamespace(cfg=cfg, data=data, module=MindLink(cfg), precision='bf16', device=torch.device('cuda', 0),
                              acc=SimpleNamespace(num_processes=1))
    nbytes = training._share_bytes(data.train, len(data.train))    # the training set as stored (float16 patches), as preloaded
    def plan(free, micro_batch=None, preload=False):
        trainer._free = free
        p = training.Trainer._plan_memory(trainer, micro_batch, nbytes if preload else 0)
        assert p.micro_batch * p.accum == 64
        return p.micro_batch, p.accum, p.grad_checkpointing
    states = 16 * sum(p.numel() for p in trainer.module.parameters())          # fp32 weights, gradients, AdamW moments
    free = lambda room: int((states + room) / 0.85)                           # free memory that leaves `room` for activations
    assert plan(2**30) == (64, 1, False)
    assert plan(free(170 * mib)) == (16, 4, False)                          # 170 MiB / 10 MiB per sample: 17, so 16
    assert plan(free(9 * mib)) == (4, 16, True)                             # not one sample without recomputation: checkpointing
    assert plan(2**30, micro_batch=8) == (8, 8, False)           # --micro-batch wins
    room = 160 * mib + nbytes // 2                                            # 16 samples fit, not 16 and the training set
    assert (plan(free(room))[0], plan(free(room), preload=True)[0], plan(free(room + nbytes), preload=True)[0]) == (16, 8, 16)
    with pytest.raises(MindLinkError, match='does not fit on this device'): plan(free(mib))
    with pytest.raises(MindLinkError, match='expected a divisor of the batch per process'): plan(2**30, micro_batch=48)


def test_bench_step_halves_the_micro_batch_on_out_of_memory(monkeypatch):
    "`mindlink bench gpu` fits the paper step by halving the micro-batch on OOM (simulated here: no GPU needed)."
    import mindlink.bench as T
    tried = []
    def fake_bench_train(preset, batch_size, grad_accum, **kw):
        tried.append(batch_size // grad_accum)
        if batch_size // grad_accum > 2: raise torch.OutOfMemoryError('CUDA out of memory (simulated)')
        return dict(micro_batch=batch_size // grad_accum, grad_accum=grad_accum)
    monkeypatch.setattr(T, 'bench_train', fake_bench_train)
    r = T.fit_step('tiny', 16, 27, False, 'cpu', 1, 1)
    assert tried == [16, 8, 4, 2] and r == dict(micro_batch=2, grad_accum=8, out_of_memory_at=[16, 8, 4])
    monkeypatch.setattr(T, 'bench_train', lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError('always')))
    with pytest.raises(MindLinkError, match='out of memory even at micro-batch 1'): T.fit_step('tiny', 4, 27, False, 'cpu', 1, 1)
