"Training (nbs/09_training.ipynb): exact resume (also after SIGTERM), two CPU processes training as one, bad input, fine-tuning helpers."
import json, os, shutil, signal, subprocess, sys, textwrap, time
from pathlib import Path

import pytest
import torch

from mindlink.model import MindLinkConfig
from mindlink.training import (as_config, bench_train, load_checkpoint, load_weights, predict_tokens, torch_load, train,
                               verify_checkpoint)
from mindlink.utils import MindLinkError, load_safetensors

CFG = dict(batch_size=16, epochs=3, warmup_epochs=1, lr=2e-3, log_every=2, eval_every=1, ckpt_every=1, dropout=0.1)


@pytest.fixture(scope='module')
def cfg(): return MindLinkConfig.tiny(**CFG)


@pytest.fixture(scope='module')
def full_run(mini_nsd_root, cfg, tmp_path_factory):
    "An uninterrupted reference run."
    out = tmp_path_factory.mktemp('full')
    return train(cfg, mini_nsd_root, out, progress_bar=False), out


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


def test_two_processes_train_as_one(mini_nsd_root, tmp_path):
    script = tmp_path / 'ddp.py'
    script.write_text(textwrap.dedent(f"""
        import sys, torch
        from mindlink.model import MindLinkConfig
        from mindlink.training import Trainer, prepare_data
        from mindlink.utils import save_safetensors
        cfg = MindLinkConfig.tiny(**{CFG!r})
        data = prepare_data(cfg, {str(mini_nsd_root)!r})
        tr = Trainer(cfg, data, sys.argv[1], device='cpu', progress_bar=False, record_batches=True)
        s = tr.fit()
        assert s['world_size'] == 2 and tr.micro == cfg.batch_size // 2, s
        save_safetensors(tr.acc.unwrap_model(tr.model).state_dict(), f'{{sys.argv[1]}}/weights_rank{{tr.acc.process_index}}.safetensors')
    """))
    out = tmp_path / 'run'
    # prepare the cache once so that the two ranks only read it
    from mindlink.training import prepare_data
    data = prepare_data(MindLinkConfig.tiny(**CFG), mini_nsd_root)
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', '29517',
                        str(script), str(out)], capture_output=True, text=True, timeout=240,
                       env={**os.environ, 'MINDLINK_NO_PROGRESS': '1', 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, r.stderr[-3000:]
    w0, _ = load_safetensors(out / 'weights_rank0.safetensors'); w1, _ = load_safetensors(out / 'weights_rank1.safetensors')
    assert _same(w0, w1)                                                                 # identical weights
    seen = [json.loads((out / f'seen_rank{r}.json').read_text()) for r in range(2)]
    B, n = CFG['batch_size'], len(data.train)
    for epoch in range(CFG['epochs']):
        s0, s1 = ({tuple(x[1:]) for x in s if x[0] == epoch} for s in seen)
        assert len(s0) == len(s1) == (n // B) * B // 2                                   # half a global batch each step
        assert not s0 & s1                                                               # disjoint data


def test_bad_config_and_checkpoints(mini_nsd_root, cfg, full_run, tmp_path):
    _, full = full_run
    with pytest.raises(MindLinkError, match=r"unknown MindLinkConfig field\(s\) \['warmup_epoch'\]"):
        as_config({**cfg.to_dict(), 'warmup_epoch': 5})
    (tmp_path / 'c.json').write_text(json.dumps({'lr': 1e-3, 'bogus': 1}))
    with pytest.raises(MindLinkError, match=r"c\.json.*bogus"): train(tmp_path / 'c.json', mini_nsd_root, tmp_path / 'x')
    # resuming with another config
    run = tmp_path / 'other'; shutil.copytree(full, run)
    with pytest.raises(MindLinkError, match=r"different config.*'lr'"):
        train(cfg.replace(lr=1e-2), mini_nsd_root, run, resume=True, progress_bar=False)
    with pytest.raises(MindLinkError, match='weights do not fit'): load_weights(type(load_checkpoint(full).model)(cfg.replace(d_model=32)), full)
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
    s = train(ft, mini_nsd_root, tmp_path, subjects=[5], n_train=16, init_from=full / 'checkpoints', progress_bar=False)
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


def test_bench_step_halves_the_micro_batch_on_out_of_memory(monkeypatch):
    "`mindlink bench gpu` fits the paper step by halving the micro-batch on OOM (simulated here: no GPU needed)."
    import mindlink.training as T
    tried = []
    def fake_bench_train(preset, batch_size, grad_accum, **kw):
        tried.append(batch_size // grad_accum)
        if batch_size // grad_accum > 2: raise torch.OutOfMemoryError('CUDA out of memory (simulated)')
        return dict(micro_batch=batch_size // grad_accum, grad_accum=grad_accum)
    monkeypatch.setattr(T, 'bench_train', fake_bench_train)
    r = T._fit_step('tiny', 16, 27, False, 'cpu', 1, 1)
    assert tried == [16, 8, 4, 2] and r == dict(micro_batch=2, grad_accum=8, out_of_memory_at=[16, 8, 4])
    monkeypatch.setattr(T, 'bench_train', lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError('always')))
    with pytest.raises(MindLinkError, match='out of memory even at micro-batch 1'): T._fit_step('tiny', 4, 27, False, 'cpu', 1, 1)
