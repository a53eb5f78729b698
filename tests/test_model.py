"""The network of paper §5.1: shapes, padding contract, parameter groups, weight loading."""

import math
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from weakseg.errors import UserError
import numpy as np

from weakseg.model import IMAGENET_MEAN, SegNet, build_model, load_vgg16_encoder, output_size, upsample_logits


@pytest.fixture(scope="module")
def vgg() -> SegNet:
    torch.manual_seed(0)
    return SegNet("vgg16").eval()


@pytest.fixture(scope="module")
def tiny() -> SegNet:
    torch.manual_seed(0)
    return SegNet("tiny", decoder_channels=32, skip_channels=8).eval()


def test_vgg16_encoder_is_torchvisions_features_without_last_pool(vgg: SegNet):
    ref = torchvision.models.vgg16().features[:30]  # 13 convs, 4 pools; the 5th pool is removed
    ours = vgg.encoder.state_dict()
    theirs = ref.state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    assert not isinstance(vgg.encoder[-1], nn.MaxPool2d)
    # paper §5.1: a 224x224 input gives 512 maps of 14x14 (stride 16)
    with torch.no_grad():
        assert vgg.encoder(torch.zeros(1, 3, 224, 224)).shape == (1, 512, 14, 14)


@pytest.mark.parametrize("h,w", [(224, 224), (375, 500), (17, 33), (16, 16), (100, 61)])
def test_output_is_a_quarter_of_any_input(tiny: SegNet, h: int, w: int):
    with torch.no_grad():
        out = tiny(torch.rand(2, 3, h, w) * 255)
    assert out.shape == (2, 21, math.ceil(h / 4), math.ceil(w / 4)) == (2, 21, *output_size(h, w))


def test_vgg16_output_grid_for_voc_sized_image(vgg: SegNet):
    with torch.no_grad():
        assert vgg(torch.zeros(1, 3, 375, 500, dtype=torch.uint8)).shape == (1, 21, 94, 125)


def test_sizes_not_multiple_of_16_are_padded_with_the_mean_colour(tiny: SegNet):
    """Documented contract: pad bottom/right with the mean colour to a multiple of 16, crop the logits."""
    img = torch.rand(1, 3, 37, 50) * 255
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    padded = mean.expand(1, 3, 48, 64).clone()
    padded[..., :37, :50] = img
    with torch.no_grad():
        direct = tiny(img)
        explicit = tiny(padded)[..., :10, :13]
    torch.testing.assert_close(direct, explicit, rtol=1e-5, atol=1e-5)


def test_model_normalises_uint8_and_float_alike(tiny: SegNet):
    img = torch.randint(0, 256, (1, 3, 32, 48), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(tiny(img), tiny(img.float()))


def test_conv_relu_bn_order_and_last_layer_plain(tiny: SegNet):
    """Fig. 2: every conv but the last is followed by ReLU then BatchNorm."""
    blocks = [tiny.skip4, tiny.skip8, tiny.dec16, *tiny.dec8, *tiny.dec4]
    for b in blocks:
        kinds = [type(m) for m in b]
        assert kinds == [nn.Conv2d, nn.ReLU, nn.BatchNorm2d]
        assert b[0].bias is not None  # BN after the ReLU cannot stand in for the conv's bias
    assert isinstance(tiny.classifier, nn.Conv2d) and tiny.classifier.out_channels == 21


def test_parameter_groups_split_encoder_from_new_layers(vgg: SegNet):
    g = vgg.param_groups()
    enc = set(map(id, vgg.encoder.parameters()))
    assert {id(p) for p in g["pretrained"]} == enc
    assert len(g["pretrained"]) == 26  # 13 convs x (weight, bias)
    assert not enc & {id(p) for p in g["new"]}
    assert len(g["pretrained"]) + len(g["new"]) == len(list(vgg.parameters()))


def test_loads_local_vgg16_weights_file(tmp_path: Path):
    torch.manual_seed(1)
    ref = torchvision.models.vgg16().features
    path = tmp_path / "vgg16-local.pth"
    torch.save({f"features.{k}": v for k, v in ref.state_dict().items()}, path)
    model = build_model("vgg16", 21, 256, 64, str(path))
    torch.testing.assert_close(model.encoder[0].weight, ref[0].weight)
    torch.testing.assert_close(model.encoder[28].bias, ref[28].bias)


def test_bad_weights_are_user_errors(tmp_path: Path, monkeypatch):
    model = SegNet("vgg16")
    with pytest.raises(UserError, match="does not exist"):
        load_vgg16_encoder(model, str(tmp_path / "missing.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable PyTorch state dict"):
        load_vgg16_encoder(model, str(junk))
    other = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, other)
    with pytest.raises(UserError, match="no `features.\\*` VGG16 weights"):
        load_vgg16_encoder(model, str(other))
    with pytest.raises(UserError, match="needs model.backbone=vgg16"):
        load_vgg16_encoder(SegNet("tiny"), str(other))

    # torchvision's weights API is what "imagenet" uses; offline it fails with a way out
    from torchvision.models import VGG16_Weights

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(type(VGG16_Weights.IMAGENET1K_V1), "get_state_dict", offline)
    with pytest.raises(UserError, match="set model.pretrained=/path/to/vgg16-397923af.pth"):
        load_vgg16_encoder(model, "imagenet")


def cell_bilinear(logits: np.ndarray, H: int, W: int, stride: int = 4) -> np.ndarray:
    """Oracle: bilinear interpolation between cell centres, cell r centred on input pixel stride*r + (stride-1)/2."""
    C, h, w = logits.shape
    out = np.empty((C, H, W))
    for y in range(H):
        u = min(max((y + 0.5) / stride - 0.5, 0.0), h - 1)
        r0 = int(np.floor(u)); r1 = min(r0 + 1, h - 1); a = u - r0
        for x in range(W):
            v = min(max((x + 0.5) / stride - 0.5, 0.0), w - 1)
            c0 = int(np.floor(v)); c1 = min(c0 + 1, w - 1); b = v - c0
            out[:, y, x] = ((1 - a) * (1 - b) * logits[:, r0, c0] + (1 - a) * b * logits[:, r0, c1]
                            + a * (1 - b) * logits[:, r1, c0] + a * b * logits[:, r1, c1])
    return out


@pytest.mark.parametrize("H, W", [(20, 28), (18, 27), (17, 25), (3, 5)])
def test_upsampled_logits_stay_on_the_cell_grid(H: int, W: int):
    """Cell (r, c) covers pixels [4r, 4r+4): its value sits at their centre, whatever H mod 4 is."""
    h, w = output_size(H, W)
    logits = torch.randn(1, 2, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(H))
    up = upsample_logits(logits, (H, W))
    assert up.shape == (1, 2, H, W)
    np.testing.assert_allclose(up[0].numpy(), cell_bilinear(logits[0].numpy(), H, W), atol=1e-12)
    # another model's grid (here: stride 8) is resized as a whole; full-size logits pass through
    other = torch.nn.functional.interpolate(logits, size=(max(1, H // 8), max(1, W // 8)))
    assert upsample_logits(other, (H, W)).shape == (1, 2, H, W)
    assert upsample_logits(up, (H, W)) is up


def test_replicate_padding_leaves_no_border_marker():
    """On a constant image every pixel of a replicate-padded net sees the same thing: constant logits. Zero
    padding marks the border (the cue a weakly supervised model can write its classes into)."""
    torch.manual_seed(0)
    flat = torch.full((1, 3, 64, 64), 120.0)
    rep, zero = SegNet("tiny", 21, 16, 4, padding="replicate").eval(), SegNet("tiny", 21, 16, 4).eval()
    zero.load_state_dict(rep.state_dict())  # same weights: only the padding differs
    with torch.no_grad():
        a, b = rep(flat), zero(flat)
    assert (a - a[..., :1, :1]).abs().max() < 1e-4
    assert (b - b[..., :1, :1]).abs().max() > 1e-2
    assert (b[..., 4:-4, 4:-4] - b[..., 8:9, 8:9]).abs().max() > 0  # zeros: the border reaches far in


def test_padding_is_part_of_the_self_describing_checkpoint(tmp_path: Path):
    from weakseg.checkpoint import load_model, model_from_config, save_checkpoint
    from weakseg.config import load_config

    cfg = load_config("demo", ["model.padding=replicate", "model.decoder_channels=16", "model.skip_channels=4"])
    save_checkpoint(tmp_path / "m.pt", cfg=cfg, model=model_from_config(cfg, pretrained=False), iteration=0)
    loaded, _, _ = load_model(tmp_path / "m.pt")
    modes = {m.padding_mode for m in loaded.modules() if isinstance(m, torch.nn.Conv2d) and m.padding != (0, 0)}
    assert modes == {"replicate"}
