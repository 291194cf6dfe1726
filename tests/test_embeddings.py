"Image embedders and the embedding cache (mindlink.embeddings): bad input, save/load, cache hits, IP-Adapter Plus loading."
import numpy as np
import pytest
import torch

from mindlink.data import NSDReader
from mindlink.embeddings import (IPAdapterPlusEmbedder, RegionPCAEmbedder, embed_stimuli, load_ip_adapter_resampler,
                                 stack_tokens)
from mindlink.reconstruction import build_tiny_sd_ip_adapter
from mindlink.utils import MindLinkError, save_safetensors


@pytest.fixture(scope='module')
def reader(mini_nsd_root):
    return NSDReader(mini_nsd_root)


@pytest.fixture(scope='module')
def pca(reader):
    split = reader.split([1, 2, 3, 4])
    train = np.unique(np.concatenate([v['train'] for v in split.values()]))
    return RegionPCAEmbedder(grid=4, dim=32, size=32).fit(reader.stimuli(train))


class Counting:
    "Counts the images an embedder is asked to embed."
    def __init__(self, emb): self.emb, self.n = emb, 0
    def __getattr__(self, k): return getattr(self.emb, k)
    def embed(self, images): self.n += len(images); return self.emb.embed(images)


def test_region_pca_shapes_and_roundtrip(pca, reader):
    test = reader.stimuli(reader.shared_images([1, 2, 3, 4]))
    z = pca.embed(test)
    assert z.shape == (len(test), 16, 32) and z.dtype == torch.float32
    x = pca.decode(z)
    assert x.shape == (len(test), 3, 32, 32) and 0 <= x.min() and x.max() <= 1
    truth = torch.from_numpy(test).permute(0, 3, 1, 2).float() / 255
    corr = lambda a, b: torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
    assert min(corr(a, b) for a, b in zip(x, truth)) > 0.5           # every image is recognisable
    # keeping every component makes the code lossless
    full = RegionPCAEmbedder(grid=4, dim=192, size=32).fit(reader.stimuli(np.arange(60)))
    assert torch.allclose(full.decode(full.embed(test)), truth, atol=2e-3)


def test_region_pca_save_load(pca, reader, tmp_path):
    imgs = reader.stimuli([0, 1, 2])
    pca.save(tmp_path / 'emb')
    back = RegionPCAEmbedder.load(tmp_path / 'emb')
    assert back.identity == pca.identity and torch.equal(back.embed(imgs), pca.embed(imgs))
    (tmp_path / 'emb' / 'region_pca.safetensors').write_bytes(b'garbage')
    with pytest.raises(MindLinkError, match='region_pca.safetensors'): RegionPCAEmbedder.load(tmp_path / 'emb')


def test_region_pca_bad_input(pca):
    with pytest.raises(MindLinkError, match='expected a uint8'): pca.embed(np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(MindLinkError, match='expected a uint8'): pca.embed(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(MindLinkError, match=r'expected shape \(n, 16, 32\)'): pca.decode(torch.zeros(2, 16, 64))
    with pytest.raises(MindLinkError, match='not fitted'): RegionPCAEmbedder().embed(np.zeros((1, 8, 8, 3), np.uint8))
    with pytest.raises(MindLinkError, match='multiple of grid'): RegionPCAEmbedder(grid=3, size=32)
    with pytest.raises(MindLinkError, match='file not found'): RegionPCAEmbedder.load('/nonexistent/emb')


def test_embed_stimuli_cache(pca, reader, tmp_path):
    ids = reader.shared_images([1, 2, 3, 4])
    c = Counting(pca)
    first = embed_stimuli(c, reader, ids[::-1], cache_dir=tmp_path, batch_size=5)
    assert c.n == len(ids) and len(list(tmp_path.iterdir())) == 1
    second = embed_stimuli(c, reader, ids, cache_dir=tmp_path, batch_size=5)
    assert c.n == len(ids)                                            # cache hit: nothing embedded
    assert all(torch.equal(first[i], second[i]) for i in ids.tolist())
    assert torch.equal(stack_tokens(second, ids[:3]), pca.embed(reader.stimuli(ids[:3])))
    embed_stimuli(c, reader, ids[:4], cache_dir=tmp_path)              # other ids: a new entry
    assert c.n == len(ids) + 4 and len(list(tmp_path.iterdir())) == 2
    other = RegionPCAEmbedder(grid=4, dim=16, size=32).fit(reader.stimuli(np.arange(40)))
    embed_stimuli(other, reader, ids, cache_dir=tmp_path)             # other embedder: its own entry
    assert len(list(tmp_path.iterdir())) == 3
    embed_stimuli(c, reader, ids, cache_dir=False)                    # cache disabled
    assert c.n == 2 * len(ids) + 4 and len(list(tmp_path.iterdir())) == 3
    with pytest.raises(MindLinkError, match='ids is empty'): embed_stimuli(pca, reader, [], cache_dir=tmp_path)
    with pytest.raises(MindLinkError, match=r'\[999999\]'): stack_tokens(second, [999999])


def test_embed_stimuli_default_cache_next_to_data(pca, reader):
    ids = reader.shared_images([1, 2])[:3]
    embed_stimuli(pca, reader, ids)
    assert any(p.name.startswith(pca.identity) for p in (reader.root / 'mindlink_cache' / 'embeddings').iterdir())


def test_ip_adapter_embedder_loads_through_real_code(tiny, reader, tmp_path):
    from diffusers import StableDiffusionPipeline
    emb = IPAdapterPlusEmbedder.from_pretrained(tiny['ip_adapter'])
    imgs = reader.stimuli([0, 1, 2])
    z = emb.embed(imgs)
    assert z.shape == (3, 16, 32) and z.dtype == torch.float32 and (emb.n_tokens, emb.dim) == (16, 32)
    px = emb.preprocess(imgs)
    assert px.shape == (3, 3, 32, 32)
    h = emb.hidden_states(px)
    assert h.shape == (3, 17, 32)                                     # CLIP penultimate: class token + 4x4 patches
    # the resampler is the one diffusers' load_ip_adapter puts into the UNet
    pipe = StableDiffusionPipeline.from_pretrained(tiny['sd'], safety_checker=None, requires_safety_checker=False)
    pipe.load_ip_adapter(tiny['ip_adapter'], subfolder='models', weight_name='ip-adapter-plus_sd15.safetensors', image_encoder_folder=None)
    with torch.no_grad(): ref = pipe.unet.encoder_hid_proj.image_projection_layers[0](h)
    assert torch.allclose(z, ref, atol=1e-6)
    # negative tokens: the resampler on an all-zero (normalised) image, as diffusers' encode_image does
    with torch.no_grad(): neg = emb.resampler(emb.hidden_states(torch.zeros(1, 3, 32, 32)))
    assert torch.allclose(emb.negative_tokens(), neg)
    # through the cache
    toks = embed_stimuli(emb, reader, [0, 1, 2], cache_dir=tmp_path)
    assert torch.allclose(stack_tokens(toks, [0, 1, 2]), z, atol=1e-5)
    assert next(tmp_path.iterdir()).name.startswith(emb.identity)


def test_ip_adapter_missing_weights(tiny, tmp_path):
    with pytest.raises(MindLinkError, match='IP-Adapter folder .* not found.*huggingface-cli download h94/IP-Adapter'):
        IPAdapterPlusEmbedder.from_pretrained(tmp_path / 'IP-Adapter')
    (tmp_path / 'ip' / 'models').mkdir(parents=True)
    with pytest.raises(MindLinkError, match='ip-adapter-plus_sd15.safetensors: IP-Adapter weight file not found'):
        IPAdapterPlusEmbedder.from_pretrained(tmp_path / 'ip')
    (tmp_path / 'ip' / 'models' / 'ip-adapter-plus_sd15.safetensors').write_bytes(
        (tiny['ip_adapter'] / 'models' / 'ip-adapter-plus_sd15.safetensors').read_bytes())
    with pytest.raises(MindLinkError, match='image_encoder: CLIP image encoder folder not found'):
        IPAdapterPlusEmbedder.from_pretrained(tmp_path / 'ip')
    save_safetensors({'image_proj.proj.weight': torch.zeros(4, 4)}, tmp_path / 'plain.safetensors')
    with pytest.raises(MindLinkError, match='no IP-Adapter \\*Plus\\* resampler'):
        load_ip_adapter_resampler(tmp_path / 'plain.safetensors')
