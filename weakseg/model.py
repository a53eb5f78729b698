"""The segmentation network of paper §5.1 / Fig. 2: a VGG16 encoder-decoder with 1x1 skips.

Encoder: torchvision's VGG16 `features` without the last max-pool (13 convs,
stride 16, 512 channels; 14x14 maps for a 224x224 input). Decoder: from stride
16 up to stride 4 in two x2 steps; at each step the encoder's last feature map
at that stride (relu4_3 at stride 8, relu3_3 at stride 4) goes through a 1x1
convolution and is concatenated, then convolutions mix local and global
information. Every convolution but the last is followed by ReLU then
BatchNorm (Fig. 2's caption); the last gives C logits at stride 4.

The model takes images in 0-255 (uint8 or float) and normalises them itself, so
the data pipeline can move uint8 batches and the neighbourhood loss sees the
same pixels. Inputs of any size work: the image is padded on the bottom and
right to a multiple of 16 (with the mean colour, i.e. 0 after normalisation),
and the logits are cropped back to ceil(H/4) x ceil(W/4), so output cell
(r, c) always covers input pixels [4r, 4r+4) x [4c, 4c+4).

A `tiny` backbone has the same stages, strides and taps with a few channels,
for CPU tests and the demo. The module is pure: no I/O beyond the optional
weight loading in `build_model`, no loss.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from weakseg.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OUTPUT_STRIDE = 4
INPUT_MULTIPLE = 16

# VGG16 configuration "D" (Simonyan & Zisserman) without the last pool; "M" = 2x2 max-pool.
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
TINY_CFG = (8, "M", 16, "M", 32, 32, "M", 48, 48, "M", 64, 64)


def make_vgg_features(cfg: tuple, padding: str = "zeros") -> nn.Sequential:
    """VGG-style conv/ReLU/pool stack; indices match torchvision's `vgg16().features`."""
    layers: list[nn.Module] = []
    in_ch = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_ch, v, kernel_size=3, padding=1, padding_mode=padding), nn.ReLU(inplace=True)]
            in_ch = v
    return nn.Sequential(*layers)


def stage_taps(cfg: tuple) -> dict[int, tuple[int, int]]:
    """{stride: (index of the last ReLU at that stride, its channels)} for strides 4, 8, 16."""
    taps: dict[int, tuple[int, int]] = {}
    idx, stride, ch = 0, 1, 3
    for v in cfg:
        if v == "M":
            idx += 1
            stride *= 2
        else:
            ch = v
            idx += 2
            taps[stride] = (idx - 1, ch)
    return {s: taps[s] for s in (4, 8, 16)}


class ConvBlock(nn.Sequential):
    """conv -> ReLU -> BatchNorm, the order of the paper's Fig. 2 caption.

    The convolution keeps its bias: BatchNorm comes after the ReLU here, so it
    cannot absorb a bias; without one every ReLU would threshold at exactly 0.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, padding: str = "zeros"):
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, padding_mode=padding),
            nn.ReLU(inplace=True),
            nn.BatchNorm2d(out_ch),
        )


class SegNet(nn.Module):
    def __init__(
        self,
        backbone: str = "vgg16",
        num_classes: int = 21,
        decoder_channels: int = 256,
        skip_channels: int = 64,
        padding: str = "zeros",
    ):
        """`padding`: how every 3x3 convolution pads ("zeros", the paper's, or "replicate")."""
        super().__init__()
        if backbone == "vgg16":
            cfg = VGG16_CFG
        elif backbone == "tiny":
            cfg = TINY_CFG
        else:
            raise ValueError(f"unknown backbone {backbone!r} (vgg16 or tiny)")
        self.backbone = backbone
        self.num_classes = num_classes
        self.encoder = make_vgg_features(cfg, padding)
        taps = stage_taps(cfg)
        self.taps = {s: i for s, (i, _) in taps.items()}
        c4, c8, c16 = taps[4][1], taps[8][1], taps[16][1]
        d16, d8, d4 = decoder_channels, decoder_channels // 2, decoder_channels // 4
        self.skip8 = ConvBlock(c8, skip_channels, kernel_size=1)
        self.skip4 = ConvBlock(c4, skip_channels, kernel_size=1)
        self.dec16 = ConvBlock(c16, d16, padding=padding)
        self.dec8 = nn.Sequential(ConvBlock(d16 + skip_channels, d8, padding=padding),
                                  ConvBlock(d8, d8, padding=padding))
        self.dec4 = nn.Sequential(ConvBlock(d8 + skip_channels, d4, padding=padding),
                                  ConvBlock(d4, d4, padding=padding))
        self.classifier = nn.Conv2d(d4, num_classes, kernel_size=1)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255, persistent=False)

    def forward(self, image: Tensor) -> Tensor:
        """image (B, 3, H, W) in 0-255 -> logits (B, C, ceil(H/4), ceil(W/4))."""
        B, _, H, W = image.shape
        x = (image.to(self.mean.dtype) - self.mean) / self.std  # (B, 3, H, W), normalised
        ph, pw = (-H) % INPUT_MULTIPLE, (-W) % INPUT_MULTIPLE
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))  # 0 = the mean colour after normalisation
        feats: dict[int, Tensor] = {}
        for i, layer in enumerate(self.encoder):
            x = layer(x)
            for s, tap in self.taps.items():
                if i == tap:
                    feats[s] = x
        # feats[4] (B, c4, Hp/4, Wp/4), feats[8] (B, c8, Hp/8, Wp/8), feats[16] (B, c16, Hp/16, Wp/16)
        y = self.dec16(feats[16])  # (B, d16, Hp/16, Wp/16)
        y = F.interpolate(y, size=feats[8].shape[-2:], mode="bilinear", align_corners=False)
        y = self.dec8(torch.cat([y, self.skip8(feats[8])], dim=1))  # (B, d8, Hp/8, Wp/8)
        y = F.interpolate(y, size=feats[4].shape[-2:], mode="bilinear", align_corners=False)
        y = self.dec4(torch.cat([y, self.skip4(feats[4])], dim=1))  # (B, d4, Hp/4, Wp/4)
        logits = self.classifier(y)  # (B, C, Hp/4, Wp/4)
        return logits[:, :, : math.ceil(H / OUTPUT_STRIDE), : math.ceil(W / OUTPUT_STRIDE)]

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """The paper's two learning-rate groups: encoder ("pretrained") and the rest ("new")."""
        enc = {id(p) for p in self.encoder.parameters()}
        return {
            "pretrained": [p for p in self.parameters() if id(p) in enc],
            "new": [p for p in self.parameters() if id(p) not in enc],
        }


def output_size(height: int, width: int) -> tuple[int, int]:
    """The logits grid of an input: (ceil(H/4), ceil(W/4))."""
    return math.ceil(height / OUTPUT_STRIDE), math.ceil(width / OUTPUT_STRIDE)


def upsample_logits(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Stride-4 logits (B, C, h, w) -> (B, C, H, W) at the input's size, cell-aligned.

    Cell (r, c) covers input pixels [4r, 4r+4) x [4c, 4c+4) (see `SegNet.forward`),
    so the logits are upsampled by exactly 4, to the padded size (4h, 4w), and
    cropped; resizing straight to (H, W) would stretch the grid by up to half a
    pixel when H or W is not a multiple of 4. Logits on any other grid (a model
    of another stride) are resized as a whole.
    """
    h, w = logits.shape[-2:]
    H, W = size
    if (h, w) == (H, W):
        return logits
    if (h, w) != output_size(H, W):  # not SegNet's grid (another model): plain bilinear resize
        return F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)
    up = F.interpolate(logits, size=(OUTPUT_STRIDE * h, OUTPUT_STRIDE * w), mode="bilinear", align_corners=False)
    return up[:, :, :H, :W]


def load_vgg16_encoder(model: SegNet, pretrained: str) -> None:
    """Load ImageNet VGG16 weights into the encoder.

    `pretrained` is "imagenet" (torchvision's `VGG16_Weights.IMAGENET1K_V1`,
    downloaded once into the torch hub cache) or the path of a local state dict
    of a torchvision `vgg16` (e.g. `vgg16-397923af.pth`), for machines without
    internet. Only `features.*` are used; the classifier is dropped.
    """
    if model.backbone != "vgg16":
        raise UserError(f"model.pretrained={pretrained!r} needs model.backbone=vgg16 (got {model.backbone})")
    if pretrained == "imagenet":
        from torchvision.models import VGG16_Weights

        try:
            state = VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
        except Exception as e:  # network or cache trouble: say how to work offline
            raise UserError(
                f"model.pretrained=imagenet: could not get torchvision's VGG16_Weights.IMAGENET1K_V1 ({e}); "
                "download vgg16-397923af.pth elsewhere and set model.pretrained=/path/to/vgg16-397923af.pth"
            ) from None
        source = "torchvision VGG16_Weights.IMAGENET1K_V1"
    else:
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise UserError(f"model.pretrained: weights file {path} does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch.load raises many kinds (UnpicklingError, RuntimeError, EOFError...)
            raise UserError(f"model.pretrained: {path} is not a readable PyTorch state dict ({e})") from None
        source = str(path)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    feats = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    if not feats:
        raise UserError(f"model.pretrained: {source} has no `features.*` VGG16 weights")
    wanted = model.encoder.state_dict()
    missing = [k for k in wanted if k not in feats]
    if missing:
        raise UserError(f"model.pretrained: {source} lacks encoder weights {missing[:4]}")
    bad = [k for k in wanted if feats[k].shape != wanted[k].shape]
    if bad:
        raise UserError(f"model.pretrained: {source} has wrong shapes for {bad[:4]} (not a VGG16?)")
    model.encoder.load_state_dict({k: feats[k] for k in wanted})


def build_model(backbone: str, num_classes: int, decoder_channels: int, skip_channels: int, pretrained: str,
                padding: str = "zeros") -> SegNet:
    model = SegNet(backbone, num_classes, decoder_channels, skip_channels, padding)
    if pretrained != "none":
        load_vgg16_encoder(model, pretrained)
    return model
