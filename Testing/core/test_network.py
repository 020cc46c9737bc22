"""The network: shapes, sizes, and numerical fidelity to the documented reference architecture."""

import pytest
import torch

from meddinov3.checkpoints.convert import dinov3_to_backbone, load_strict, primus_decoder_to_decoder
from meddinov3.config import SIZES, ModelConfig, model_config, quartile_blocks
from meddinov3.model import build_model

from .reference_dinov3 import make_dinov3_state_dict, make_primus_decoder_state_dict, reference_forward


def rel_l2(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_quartile_blocks_match_the_paper():
    assert quartile_blocks(12) == (2, 5, 8, 11)
    assert quartile_blocks(24) == (5, 11, 17, 23)


def test_base_configuration_is_the_paper_network():
    cfg = model_config("base", num_classes=16)
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.num_reg_tokens, cfg.qkv_bias) == (768, 12, 12, 4, False)
    assert cfg.norm_eps == 1e-6 and cfg.rope_base == 100.0 and cfg.layer_scale_init == 1e-5
    assert cfg.decoder_channels == (3072, 1536, 768, 384, 192)
    net = build_model(cfg)
    n_backbone = sum(p.numel() for p in net.backbone.parameters())
    n_decoder = sum(p.numel() for p in net.decoder.parameters())
    assert 85e6 < n_backbone < 87e6 and 24e6 < n_decoder < 26e6
    assert all(m.eps == 1e-6 for m in net.modules() if isinstance(m, torch.nn.LayerNorm))


@pytest.mark.parametrize("size", sorted(SIZES))
def test_every_size_builds_with_consistent_heads(size):
    cfg = model_config(size, num_classes=3)
    assert cfg.embed_dim % (4 * cfg.num_heads) == 0
    assert len(cfg.feature_blocks) == 4 and cfg.feature_blocks[-1] == cfg.depth - 1


@pytest.mark.parametrize("hw", [(64, 64), (70, 50), (17, 33)])
def test_any_slice_size_gives_logits_of_the_same_size(hw):
    torch.manual_seed(0)
    net = build_model(model_config("tiny", num_classes=3)).eval()
    x = torch.randn(2, 1, *hw)
    with torch.no_grad():
        y = net(x)
    assert y.shape == (2, 3, *hw)
    assert torch.isfinite(y).all()


def test_padding_does_not_change_the_aligned_part():
    """An image that is already a multiple of 16 gives the same logits as through the padded path's crop."""
    torch.manual_seed(0)
    net = build_model(model_config("tiny", num_classes=2)).eval()
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        full = net(x)
        again = net(x.clone())
    assert torch.equal(full, again)


def test_rejects_multichannel_input():
    net = build_model(model_config("tiny", num_classes=2))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        net(torch.zeros(1, 3, 32, 32))


def network_from_reference(cfg: ModelConfig, enc: dict, dec: dict):
    """Our network (eval mode) holding the reference encoder `enc` and decoder `dec` state dicts."""
    net = build_model(cfg).eval()
    sd = {f"backbone.{k}": v for k, v in dinov3_to_backbone(enc, "test").items()}
    sd.update({f"decoder.{k}": v for k, v in primus_decoder_to_decoder(dec, 4, "test").items()})
    load_strict(net, sd, "test")
    return net


@pytest.mark.parametrize("variant", ["meddinov3_multiscale", "single_scale", "qkv_bias_no_registers", "small_like"])
def test_fidelity_to_reference_network_fp32(variant):
    """Same weights -> same logits as the documented reference network (relative L2 error < 1e-4)."""
    params = dict(embed_dim=96, depth=4, num_heads=2, n_reg=4, qkv_bias=False)
    blocks = quartile_blocks(4)
    if variant == "single_scale":
        blocks = (3,)
    elif variant == "qkv_bias_no_registers":  # the reference dinov3_* trainers' vit_base defaults
        params.update(n_reg=0, qkv_bias=True)
    elif variant == "small_like":
        params.update(embed_dim=192, depth=8, num_heads=3)
        blocks = quartile_blocks(8)
    enc = make_dinov3_state_dict(**params, seed=3)
    dec = make_primus_decoder_state_dict(params["embed_dim"] * len(blocks), num_classes=5)
    cfg = ModelConfig(size="custom", num_classes=5, embed_dim=params["embed_dim"], depth=params["depth"],
                      num_heads=params["num_heads"], num_reg_tokens=params["n_reg"], qkv_bias=params["qkv_bias"],
                      feature_blocks=blocks)
    net = network_from_reference(cfg, enc, dec)
    x = torch.randn(2, 1, 64, 96, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = net(x)
        ref = reference_forward(enc, dec, x, blocks, params["num_heads"])
    assert ours.shape == ref.shape
    assert rel_l2(ours, ref) < 1e-4


def test_reference_precision_matches_the_references_bf16_rope():
    """--reference-precision: RoPE tables and the q/k rotation in bf16 as the reference computes them by default.
    The switched network is far closer to the bf16 reference than to the fp32 one, and switching back restores fp32."""
    enc = make_dinov3_state_dict(seed=6)
    dec = make_primus_decoder_state_dict(96 * 4, num_classes=3)
    cfg = ModelConfig(size="custom", num_classes=3, embed_dim=96, depth=4, num_heads=2, feature_blocks=(0, 1, 2, 3))
    net = network_from_reference(cfg, enc, dec)
    x = torch.randn(2, 1, 48, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref_bf16 = reference_forward(enc, dec, x, (0, 1, 2, 3), 2, bf16_rope=True)
        ref_fp32 = reference_forward(enc, dec, x, (0, 1, 2, 3), 2)
        fp32 = net(x)
        net.backbone.set_reference_precision(True)
        bf16 = net(x)
        net.backbone.set_reference_precision(False)
        again = net(x)
    assert rel_l2(ref_bf16, ref_fp32) > 1e-4  # the two precisions are distinguishable
    assert rel_l2(bf16, ref_bf16) < 1e-5 and rel_l2(fp32, ref_bf16) > 1e-4
    assert torch.equal(again, fp32)


def test_fidelity_detects_a_wrong_norm_eps():
    """The fidelity check is sensitive: timm's default eps (1e-5) instead of 1e-6 is caught."""
    enc = make_dinov3_state_dict(seed=4)
    dec = make_primus_decoder_state_dict(96 * 4, num_classes=3)
    cfg = ModelConfig(size="custom", num_classes=3, embed_dim=96, depth=4, num_heads=2, feature_blocks=(0, 1, 2, 3),
                      norm_eps=1e-5)
    net = network_from_reference(cfg, enc, dec)
    x = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 0.01
    with torch.no_grad():
        assert rel_l2(net(x), reference_forward(enc, dec, x, (0, 1, 2, 3), 2)) > 1e-6


def test_checkpoint_periods_are_used_not_recomputed():
    enc = make_dinov3_state_dict(seed=2)
    enc["rope_embed.periods"] = enc["rope_embed.periods"] * 1.5  # distinct from the formula
    cfg = ModelConfig(size="custom", num_classes=2, embed_dim=96, depth=4, num_heads=2, feature_blocks=(0, 1, 2, 3))
    net = build_model(cfg)
    dec = make_primus_decoder_state_dict(96 * 4, num_classes=2)
    sd = {f"backbone.{k}": v for k, v in dinov3_to_backbone(enc, "t").items()}
    sd.update({f"decoder.{k}": v for k, v in primus_decoder_to_decoder(dec, 4, "t").items()})
    load_strict(net, sd, "t")
    assert torch.equal(net.backbone.vit.rope.periods, enc["rope_embed.periods"].float())
    x = torch.randn(1, 1, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_l2(net.eval()(x), reference_forward(enc, dec, x, (0, 1, 2, 3), 2)) < 1e-4


def test_backward_pass_reaches_every_parameter():
    net = build_model(model_config("tiny", num_classes=3, depth=2))
    x = torch.randn(2, 1, 32, 48)
    net(x).sum().backward()
    unused = [n for n, p in net.named_parameters() if p.grad is None and n != "backbone.mask_token"]
    assert unused == []


def test_cpu_inference_rows_match_the_convolutions(monkeypatch):
    """CPU inference runs the decoder as GEMMs on pixel rows (chunked depth first); it must give the logits of the
    transposed convolutions that training uses, follow weight changes, and return channels-last logits."""
    net = build_model(model_config("tiny", num_classes=4, depth=2)).eval()
    x = torch.randn(2, 1, 48, 64, generator=torch.Generator().manual_seed(0))  # a multiple of the patch: no crop
    with torch.enable_grad():
        conv = net(x).detach()
    monkeypatch.setattr(type(net.decoder), "ROW_CHUNK", 512)  # force several chunks at every small stage
    with torch.no_grad():
        rows = net(x)
    assert rows.is_contiguous(memory_format=torch.channels_last)
    assert rel_l2(rows, conv) < 1e-5
    with torch.no_grad():
        net.decoder.head.bias += 1.0
        net.decoder.stages[-1][0].weight.mul_(2.0)
        changed = net(x)
    with torch.enable_grad():
        assert rel_l2(changed, net(x).detach()) < 1e-5
    assert rel_l2(changed, rows) > 1e-2
