"""GPU checks, flagged `cuda` (`pytest -m cuda`): `mindlink bench gpu` runs them on a CUDA machine (nbs/13a_benchmarks.ipynb);
without a GPU they are skipped. Each one checks something a CPU cannot: no host sync in a training step, the compiled
model, bf16 training and resume, the GPU batch paths, reconstruction on the GPU."""
import pytest
import torch

from mindlink.model import MindLink, MindLinkConfig
from mindlink.bench import bench_batches, synthetic_train_data
from mindlink.runs import verify_checkpoint
from mindlink.training import LOSS_KEYS, Trainer, train

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')]

ROI = dict(shape=(16, 16, 16), n_voxels=300)  # a small synthetic ROI: L = 48 patches of 4^3 voxels


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    "A float16 patch store (4 subjects x 16 images) with random targets, at the tiny preset's shapes."
    return synthetic_train_data(MindLinkConfig.tiny(), 64, tmp_path_factory.mktemp('store'), roi_kw=ROI)


def _inputs(cfg, n=4, L=27, device='cuda'):
    g = torch.Generator().manual_seed(0)
    coords = torch.stack(torch.meshgrid(*[torch.arange(3)] * 3, indexing='ij'), -1).reshape(-1, 3)[:L]
    B, z = torch.randn(n, L, cfg.patch_dim, generator=g), torch.randn(n, cfg.n_tokens, cfg.token_dim, generator=g)
    s = torch.arange(n) % cfg.n_subjects
    return [t.to(device) for t in (B, coords, s, z)]


def test_training_step_never_waits_for_the_gpu(data, tmp_path):
    cfg = MindLinkConfig.tiny(batch_size=8, epochs=2, warmup_epochs=1, mixed_precision='bf16')
    tr = Trainer(cfg, data, tmp_path, device='cuda', preload=True, progress_bar=False)
    t = tr._tensors['patches']
    assert t.is_cuda and t.dtype == torch.float16 and len(t) == len(tr.sampler.share)  # the rank's share, as stored
    it, sums = iter(tr.batches()), torch.zeros(len(LOSS_KEYS), device=tr.device)
    for step in (0, tr.schedule.warmup_steps):  # one step of each phase first: kernels chosen, workspaces allocated
        tr.state['step'] = step; tr.train_step([next(it)], sums)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')  # any device->host sync now raises
    try:
        for step in (0, tr.schedule.warmup_steps):
            tr.state['step'] = step; tr.train_step([next(it)], sums)
    finally: torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(sums).all() and (sums[:2] > 0).all()


def test_compiled_model_matches_eager_with_one_graph_per_phase():
    import torch._dynamo, torch._inductor.config
    torch._dynamo.reset()
    cfg = MindLinkConfig.tiny(pos_grid=(3, 3, 3))   # _inputs' grid
    torch.manual_seed(0); model = MindLink(cfg).cuda().train()
    B, coords, s, z = _inputs(cfg)
    alpha = torch.tensor(0.3, device='cuda')
    compiled = torch.compile(model)
    with torch._inductor.config.patch(fallback_random=True):  # the same random masks as eager
        for rec_only in (True, False):
            torch.manual_seed(1); ref = model(B, coords, s, z, dann_coeff=alpha, rec_only=rec_only)
            torch.manual_seed(1); out = compiled(B, coords, s, z, dann_coeff=alpha, rec_only=rec_only)
            for k in LOSS_KEYS: torch.testing.assert_close(out[k], ref[k], rtol=1e-3, atol=1e-4)
            model.zero_grad(); ref['loss'].backward(); g_ref = model.encoder.patch_embed.weight.grad.clone()
            model.zero_grad(); out['loss'].backward()
            torch.testing.assert_close(model.encoder.patch_embed.weight.grad, g_ref, rtol=1e-3, atol=1e-5)
        with torch._dynamo.config.patch(error_on_recompile=True):  # α moves every step: no new graph for it
            for a in (0.0, 0.5, 0.99):
                alpha.fill_(a)
                for rec_only in (True, False): compiled(B, coords, s, z, dann_coeff=alpha, rec_only=rec_only)['loss'].backward()


def test_bf16_training_on_the_gpu_resumes(data, tmp_path):
    cfg = MindLinkConfig.tiny(batch_size=8, epochs=2, warmup_epochs=1, log_every=2, eval_every=1, ckpt_every=1)
    half = train(cfg, data, tmp_path, device='cuda', max_steps=5, progress_bar=False).summary
    assert half['precision'] == ('bf16' if torch.cuda.is_bf16_supported() else 'fp16') and half['step'] == 5
    assert verify_checkpoint(tmp_path)['step'] == 5
    full = train(cfg, data, tmp_path, resume=True, device='cuda', progress_bar=False).summary
    assert full['step'] == full['total_steps'] == 16
    assert all(torch.isfinite(torch.tensor(full['last'][k])) for k in LOSS_KEYS)


def test_gpu_batch_paths():
    r = bench_batches('tiny', batch_size=8, n_images=48, workers=(0, 2), batches=2, device='cuda', roi_kw=ROI)
    rows = {row['path']: row for row in r['rows']}
    assert set(rows) == {'host, 0 workers', 'host, 2 workers', 'preloaded on cuda'}
    assert rows['preloaded on cuda']['patches_dtype'] == 'float16' and all(row['samples_per_s'] > 0 for row in rows.values())


def test_predict_on_gpu_matches_cpu():
    cfg = MindLinkConfig.tiny(pos_grid=(3, 3, 3))   # _inputs' grid
    torch.manual_seed(0); model = MindLink(cfg).eval()
    B, coords, _, _ = _inputs(cfg, device='cpu')
    cpu = model.predict(B, coords)
    model.cuda()
    torch.testing.assert_close(model.predict(B.cuda(), coords.cuda()).cpu(), cpu, rtol=1e-3, atol=1e-4)  # fp32 on the GPU
    with torch.autocast('cuda', dtype=torch.bfloat16):                                                  # as predict_tokens runs it
        torch.testing.assert_close(model.predict(B.cuda(), coords.cuda()).float().cpu(), cpu, rtol=0.05, atol=0.05)


def test_reconstruction_on_the_gpu(tiny):
    from mindlink.reconstruction import SDReconstructor
    rec = SDReconstructor.from_pretrained(tiny['sd'], tiny['ip_adapter'], device='cuda')
    assert rec.dtype == torch.float16 and rec.pipe.unet.device.type == 'cuda'
    x = rec.reconstruct(torch.randn(2, rec.n_tokens, rec.dim), steps=2, batch_size=2, show_progress=False)
    assert x.shape == (2, 3, 32, 32) and torch.isfinite(x).all() and 0 <= x.min() and x.max() <= 1
