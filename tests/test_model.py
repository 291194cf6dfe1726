"Bad config and checkpoint input for mindlink.model, safe loading, and the model on a real MiniNSD layout."
import json
import pickle

import numpy as np
import pytest
import torch

from mindlink.model import MindLink, MindLinkConfig, model_flops
from mindlink.utils import MindLinkError, load_safetensors, save_safetensors


GRID = (3, 3, 3)  # the patch grid of _inputs' coordinates (the tiny preset embeds patches per grid cell)


def _inputs(cfg, n=3, L=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    coords = torch.stack(torch.meshgrid(*[torch.arange(3)] * 3, indexing='ij'), -1).reshape(-1, 3)[:L]
    return (torch.randn(n, L, cfg.patch_dim, generator=g), coords, torch.arange(n) % cfg.n_subjects,
            torch.randn(n, cfg.n_tokens, cfg.token_dim, generator=g))


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = MindLink(MindLinkConfig.tiny(pos_grid=GRID))
    return model, model.save_pretrained(tmp_path / 'ckpt')


def test_unknown_config_fields_are_named():
    d = {**MindLinkConfig.tiny().to_dict(), 'd_modle': 64, 'lrate': 1e-3}
    with pytest.raises(MindLinkError, match=r"'d_modle' \(did you mean 'd_model'\?\), 'lrate'"): MindLinkConfig.from_dict(d)
    with pytest.raises(MindLinkError, match='d_modle'): MindLinkConfig.tiny(d_modle=64)


@pytest.mark.parametrize('kw, msg', [(dict(n_heads=5), 'divisible'), (dict(patch_dim=100), 'patch\\*\\*3'),
                                      (dict(mask_ratio=1.0), 'mask_ratio'), (dict(lambdas=(1, 1, 1)), 'lambdas'),
                                      (dict(mixed_precision='fp8'), 'mixed_precision'), (dict(n_subjects=0), 'n_subjects'),
                                      (dict(warmup_epochs=200), 'warmup_epochs'), (dict(mask_mode='noise'), 'mask_mode')])
def test_invalid_config_values(kw, msg):
    with pytest.raises(MindLinkError, match=msg): MindLinkConfig.tiny(**kw)


def test_config_json_round_trip(tmp_path):
    cfg = MindLinkConfig.paper(n_subjects=3, use_cross_attention=False)
    cfg.save(tmp_path / 'c.json')
    assert MindLinkConfig.load(tmp_path / 'c.json') == cfg


def test_checkpoint_config_with_unknown_field(saved):
    _, d = saved
    c = json.loads((d / 'config.json').read_text()); c['n_layers'] = 3
    (d / 'config.json').write_text(json.dumps(c))
    with pytest.raises(MindLinkError, match=r"config.json: unknown MindLinkConfig field\(s\) 'n_layers'"):
        MindLink.from_pretrained(d)


@pytest.mark.parametrize('text', ['{"patch": 4', '[1, 2]'])
def test_checkpoint_config_malformed(saved, text):
    _, d = saved
    (d / 'config.json').write_text(text)
    with pytest.raises(MindLinkError, match='config.json'): MindLink.from_pretrained(d)


def test_checkpoint_missing_files(saved, tmp_path):
    _, d = saved
    with pytest.raises(MindLinkError, match='not a folder'): MindLink.from_pretrained(tmp_path / 'nope')
    (d / 'model.safetensors').unlink()
    with pytest.raises(MindLinkError, match='model.safetensors: file not found'): MindLink.from_pretrained(d)


def test_checkpoint_config_mismatch(saved):
    _, d = saved
    c = json.loads((d / 'config.json').read_text()); c['d_model'] = 32
    (d / 'config.json').write_text(json.dumps(c))
    with pytest.raises(MindLinkError, match=r'does not match .*wrong shape \[.*encoder'): MindLink.from_pretrained(d)


def test_checkpoint_missing_and_unexpected_tensors(saved):
    _, d = saved
    t, _ = load_safetensors(d / 'model.safetensors')
    t.pop('projector.net.1.weight'); t['extra.weight'] = torch.zeros(2)
    save_safetensors(t, d / 'model.safetensors')
    with pytest.raises(MindLinkError, match=r"missing \['projector.net.1.weight'\], unexpected \['extra.weight'\]"):
        MindLink.from_pretrained(d)


def test_truncated_safetensors(saved):
    _, d = saved
    p = d / 'model.safetensors'
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(MindLinkError, match='model.safetensors.*truncated or corrupt'): MindLink.from_pretrained(d)


def test_pickle_file_is_refused(saved):
    "A torch.save (pickle) file in place of the weights is rejected, not unpickled."
    _, d = saved
    torch.save({'a': torch.zeros(1)}, d / 'model.safetensors')
    with pytest.raises(MindLinkError, match='truncated or corrupt'): MindLink.from_pretrained(d)


def test_loading_never_unpickles(saved, monkeypatch):
    model, d = saved
    def boom(*a, **k): raise AssertionError('unpickling during from_pretrained')
    for mod, name in ((pickle, 'load'), (pickle, 'loads'), (torch, 'load')): monkeypatch.setattr(mod, name, boom)
    loaded = MindLink.from_pretrained(d)
    B, coords, _, _ = _inputs(model.cfg)
    assert torch.equal(loaded.predict(B, coords), model.predict(B, coords))


def test_overrides_on_load(saved):
    model, d = saved
    B, coords, _, _ = _inputs(model.cfg)
    for kw in (dict(n_subjects=7), dict(use_subject_loss=False), dict(use_cross_attention=False), dict(lr=1e-5)):
        m = MindLink.from_pretrained(d, **kw)
        assert torch.equal(m.predict(B, coords), model.predict(B, coords)), kw
    assert MindLink.from_pretrained(d, n_subjects=7).subject_classifier.head.out_features == 7


@pytest.mark.parametrize('bad, msg', [('patches', 'patches'), ('coords', 'coords'), ('subject', 'subject'), ('target', 'target')])
def test_forward_bad_input(bad, msg):
    cfg = MindLinkConfig.tiny(pos_grid=GRID)
    model = MindLink(cfg)
    B, coords, s, z = _inputs(cfg)
    args = dict(patches=B, coords=coords, subject=s, target=z)
    args[bad] = dict(patches=B[..., :10], coords=coords[:5], subject=s + cfg.n_subjects, target=z[:, :3])[bad]
    with pytest.raises(MindLinkError, match=msg): model(**args)


def test_zero_mask_mode_and_flops():
    cfg = MindLinkConfig.tiny(mask_mode='zero', pos_grid=GRID)
    B, coords, s, z = _inputs(cfg)
    out = MindLink(cfg)(B, coords, s, z)
    assert out['rec'] > 0 and torch.isfinite(out['loss'])
    assert model_flops(cfg, 20)['encoder (masked pass)'] == model_flops(cfg, 20)['encoder (full pass)']
    with pytest.raises(MindLinkError, match='mode'): model_flops(cfg, 20, mode='eval')


def test_model_on_mini_nsd_layout(mini_nsd_root):
    "The tiny preset runs on real MiniNSD patch tokens, with coordinates from the PatchLayout, and learns."
    from mindlink.data import NSDReader
    from mindlink.patching import PatchLayout
    reader = NSDReader(mini_nsd_root)
    subjects = reader.subjects()[:4]
    data = {s: reader.load_subject(s) for s in subjects}
    cfg = MindLinkConfig.tiny(n_subjects=len(subjects))
    layout = PatchLayout.fit({s: data[s].roi for s in subjects}, patch=cfg.patch)
    X = torch.cat([torch.as_tensor(layout.roi_tokens(s, data[s].betas)) for s in subjects]).float()
    subj = torch.cat([torch.full((len(data[s].betas),), i) for i, s in enumerate(subjects)])
    coords = torch.as_tensor(layout.coords)
    cfg = cfg.with_grid(coords)
    assert X.shape[1:] == (layout.n_patches, cfg.patch_dim)
    idx = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))[:24]   # a mixed-subject batch
    X, subj = X[idx], subj[idx]
    torch.manual_seed(0)
    model = MindLink(cfg)
    z = torch.randn(len(X), cfg.n_tokens, cfg.token_dim)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    aligns = []
    for step in range(10):
        out = model(X, coords, subj, z)
        opt.zero_grad(); out['loss'].backward(); opt.step()
        aligns.append(out['align'].item())
    assert all(torch.isfinite(out[k]) for k in ('loss', 'rec', 'subj', 'align', 'local'))
    assert aligns[-1] < aligns[0]
    assert model.predict(X, coords).shape == (len(X), cfg.n_tokens, cfg.token_dim)


def test_rec_only_without_masking_is_refused():
    cfg = MindLinkConfig.tiny(mask_ratio=0.0, pos_grid=GRID)
    B, coords, s, z = _inputs(cfg)
    with pytest.raises(MindLinkError, match='mask_ratio'): MindLink(cfg)(B, coords, s, z, rec_only=True)
    out = MindLink(cfg)(B, coords, s, z)
    assert out['rec'] == 0 and out['align'] > 0
