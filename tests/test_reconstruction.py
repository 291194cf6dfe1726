"Reconstruction (mindlink.reconstruction): SD + IP-Adapter Plus with injected tokens, the offline decoder, figures, benchmark."
import numpy as np
import pytest
import torch

from mindlink.embeddings import IPAdapterPlusEmbedder, RegionPCAEmbedder, load_ip_adapter_resampler
from mindlink.bench import bench_reconstruct
from mindlink.reconstruction import (RegionPCADecoder, SDReconstructor, build_tiny_sd_ip_adapter,
                                     inject_tokens, make_reconstructor, plot_reconstructions)
from mindlink.utils import MindLinkError


@pytest.fixture(scope='module')
def emb(tiny):
    return IPAdapterPlusEmbedder.from_pretrained(tiny['ip_adapter'])


@pytest.fixture(scope='module')
def rec(tiny):
    return SDReconstructor.from_pretrained(tiny['sd'], tiny['ip_adapter'])


def _images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 40, 40, 3), dtype=np.uint8)


def test_tiny_layout_on_disk(tiny):
    assert (tiny['sd'] / 'model_index.json').exists() and (tiny['sd'] / 'unet' / 'config.json').exists()
    assert (tiny['ip_adapter'] / 'models' / 'image_encoder' / 'config.json').exists()
    assert (tiny['ip_adapter'] / 'models' / 'ip-adapter-plus_sd15.safetensors').exists()


def test_reconstruct_end_to_end_and_seeded(rec, emb):
    b = emb.embed(_images(3))
    assert torch.equal(rec.negative_tokens, emb.negative_tokens())
    x = rec.reconstruct(b, seed=0, steps=2, batch_size=3, show_progress=False)
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert torch.equal(rec.reconstruct(b, seed=0, steps=2, batch_size=3, show_progress=False), x)   # deterministic
    assert not torch.allclose(rec.reconstruct(b, seed=1, steps=2, batch_size=3, show_progress=False), x, atol=1e-3)
    # the tokens matter: other tokens, other images
    assert not torch.allclose(rec.reconstruct(emb.embed(_images(3, seed=9)), seed=0, steps=2, batch_size=3, show_progress=False), x, atol=1e-3)
    # guidance off: the pipeline gets only the positive tokens
    assert rec.reconstruct(b[:1], steps=2, guidance=1.0, show_progress=False).shape == (1, 3, 32, 32)


def test_identity_injection_reproduces_resampler(tiny, emb):
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(tiny['sd'], safety_checker=None, requires_safety_checker=False)
    pipe.load_ip_adapter(tiny['ip_adapter'], subfolder='models', weight_name='ip-adapter-plus_sd15.safetensors', image_encoder_folder=None)
    pipe.set_progress_bar_config(disable=True)
    px = emb.preprocess(_images(2))
    h, h0 = emb.hidden_states(px), emb.hidden_states(torch.zeros_like(px))
    e = pipe.encode_prompt('', 'cpu', 1, False)[0].expand(2, -1, -1)

    def run(embeds):
        return pipe(prompt_embeds=e, negative_prompt_embeds=e, ip_adapter_image_embeds=[embeds], num_inference_steps=2,
                    generator=[torch.Generator().manual_seed(i) for i in range(2)], output_type='pt').images

    ref = run(torch.cat([h0, h])[:, None])
    resampler = inject_tokens(pipe)
    assert isinstance(pipe.unet.encoder_hid_proj.image_projection_layers[0], torch.nn.Identity)
    with torch.no_grad(): tok = torch.cat([resampler(h0), resampler(h)])[:, None]
    assert torch.allclose(run(tok), ref, atol=1e-5)
    # and a wrong token set does change the output (the check can fail)
    assert not torch.allclose(run(tok.flip(0)), ref, atol=1e-3)
    with pytest.raises(MindLinkError, match='no IP-Adapter loaded'):
        inject_tokens(StableDiffusionPipeline.from_pretrained(tiny['sd'], safety_checker=None, requires_safety_checker=False))


def test_builder_resampler_roundtrip(tiny):
    "The builder writes the original IP-Adapter key layout; diffusers' converter turns it back into the same module."
    from safetensors import safe_open
    with safe_open(str(tiny['ip_adapter'] / 'models' / 'ip-adapter-plus_sd15.safetensors'), 'pt') as f: keys = set(f.keys())
    assert {'image_proj.latents', 'image_proj.layers.0.0.to_kv.weight', 'image_proj.layers.3.1.3.weight',
            'ip_adapter.1.to_k_ip.weight', 'ip_adapter.3.to_v_ip.weight'} <= keys
    r = load_ip_adapter_resampler(tiny['ip_adapter'] / 'models' / 'ip-adapter-plus_sd15.safetensors')
    assert r.latents.shape == (1, 16, 64) and r.proj_out.out_features == 32


def test_missing_weights_and_bad_tokens(tiny, rec, tmp_path):
    with pytest.raises(MindLinkError, match='Stable Diffusion folder not found.*huggingface-cli download stable-diffusion-v1-5'):
        SDReconstructor.from_pretrained(tmp_path / 'sd', tiny['ip_adapter'])
    with pytest.raises(MindLinkError, match='huggingface-cli download h94/IP-Adapter'):
        SDReconstructor.from_pretrained(tiny['sd'], tmp_path / 'ip')
    with pytest.raises(MindLinkError, match=r'expected shape \(n, 16, 32\)'): rec.reconstruct(torch.zeros(2, 16, 768))
    with pytest.raises(MindLinkError, match='NaN'): rec.reconstruct(torch.full((1, 16, 32), float('nan')))


def test_region_pca_decoder_interface(tmp_path, tiny):
    imgs = _images(40)
    pca = RegionPCAEmbedder(dim=32, size=32).fit(imgs)
    dec = make_reconstructor(pca)
    assert isinstance(dec, RegionPCADecoder) and (dec.n_tokens, dec.dim) == (16, 32)
    x = dec.reconstruct(pca.embed(imgs[:5]), seed=3, steps=50, guidance=7.5, batch_size=2)
    assert x.shape == (5, 3, 32, 32) and torch.equal(x, pca.decode(pca.embed(imgs[:5])))
    with pytest.raises(MindLinkError, match='no decoder for object'): make_reconstructor(object())
    # tokens and decoder of different embedders: an error naming both sides
    with pytest.raises(MindLinkError, match=f"region-PCA tokens .*cannot drive Stable Diffusion.*{tiny['sd']}"): make_reconstructor(pca, tiny['sd'])
    ip = IPAdapterPlusEmbedder.from_pretrained(tiny['ip_adapter'])
    with pytest.raises(MindLinkError, match='IP-Adapter Plus tokens from .*ip-adapter-plus_sd15.safetensors.*pass sd_path'): make_reconstructor(ip)


def test_plot_reconstructions(tmp_path):
    stim = _images(3)
    fig = plot_reconstructions(stim, {'subj01': torch.rand(3, 3, 16, 16), 'subj02': torch.rand(3, 3, 16, 16)}, path=tmp_path / 'fig2.png')
    assert len(fig.axes) == 9 and (tmp_path / 'fig2.png').stat().st_size > 0
    assert [a.get_title() for a in fig.axes[:3]] == ['stimulus', 'subj01', 'subj02']
    with pytest.raises(MindLinkError, match='subj01 has 2 images'): plot_reconstructions(stim, {'subj01': torch.rand(2, 3, 8, 8)})


def test_bench_reconstruct_tiny():
    r = bench_reconstruct(batch_sizes=(1, 2), steps=1, device='cpu')          # on a CPU the default is the tiny pipeline
    assert r['config'] == 'tiny' and r['size'] == 32 and r['steps'] == 1 and len(r['rows']) == 2
    assert all(row['recon_per_s'] > 0 for row in r['rows']) and r['best_recon_per_s'] == max(row['recon_per_s'] for row in r['rows'])
    with pytest.raises(MindLinkError, match='expected one of'): bench_reconstruct('sdxl')


def test_library_output_only_where_it_helps(tiny, tmp_path, capsys, monkeypatch):
    """transformers' and diffusers' own bars (saving, loading weights) follow mindlink's rule, none off a terminal;
    their warnings about an image encoder we never use are not shown."""
    monkeypatch.delenv('MINDLINK_NO_PROGRESS', raising=False)   # pytest's captured stderr is not a terminal
    SDReconstructor.from_pretrained(tiny['sd'], tiny['ip_adapter'])
    build_tiny_sd_ip_adapter(tmp_path / 'a')
    err = capsys.readouterr().err
    assert '%|' not in err and 'Loading' not in err and 'Writing model shards' not in err, err
    assert 'image_encoder is not loaded' not in err and 'kept in float32' not in err, err   # diffusers' warnings that do not apply
    monkeypatch.setenv('MINDLINK_NO_PROGRESS', '0')            # bars forced on: the same calls draw them
    SDReconstructor.from_pretrained(tiny['sd'], tiny['ip_adapter'])
    build_tiny_sd_ip_adapter(tmp_path / 'b')
    err = capsys.readouterr().err
    assert 'Loading pipeline components' in err and 'Writing model shards' in err, err
    from diffusers.utils import logging as dl
    from transformers.utils import logging as tl
    assert tl.is_progress_bar_enabled() and dl.get_verbosity() == dl.WARNING   # switched back as they were after each call
