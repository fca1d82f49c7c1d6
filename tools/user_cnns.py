"""A zoo of small CNNs written the way users write them (issue 16): each class is a plain nn.Module whose docstring
names the pattern it stands for. `zoo()` maps a name to an `Entry` (constructor and input shapes); the rest of the
zoo is in `user_cnns_more.py` and `user_cnns_idioms.py`, the `Entry` record and the `conv_bn` block they share in
`user_cnns_entry.py`. `tools/bench_user_cnns.py` compiles, masks and prunes every entry.

Every model is tiny (8-32 channels, inputs of 32x32 or less) so that the whole sweep runs in seconds.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from user_cnns_entry import Entry, conv_bn
from user_cnns_idioms import IDIOMS
from user_cnns_more import MORE


class UNet(nn.Module):
    """U-Net: encoder, ConvTranspose and bilinear upsampling, skip connections concatenated."""

    def __init__(self, classes: int = 2):
        super().__init__()
        self.enc1 = nn.Sequential(conv_bn(3, 8), conv_bn(8, 8))
        self.enc2 = nn.Sequential(conv_bn(8, 16), conv_bn(16, 16))
        self.bottom = conv_bn(16, 32)
        self.up2 = nn.ConvTranspose2d(32, 16, 2, stride=2)
        self.dec2 = conv_bn(32, 16)
        self.reduce1 = nn.Conv2d(16, 8, 1)
        self.dec1 = conv_bn(16, 8)
        self.head = nn.Conv2d(8, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        b = self.bottom(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], dim=1))
        up1 = F.interpolate(self.reduce1(d2), scale_factor=2, mode="bilinear", align_corners=False)
        return self.head(self.dec1(torch.cat([up1, e1], dim=1)))


class Backbone(nn.Module):
    """Three strided stages returning their feature maps (the input of the necks below)."""

    def __init__(self, widths: tuple[int, ...] = (8, 16, 24)):
        super().__init__()
        ins = (3, *widths[:-1])
        self.stages = nn.ModuleList(conv_bn(c_in, c_out, stride=2) for c_in, c_out in zip(ins, widths, strict=True))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class FPN(nn.Module):
    """FPN neck: 1x1 laterals, nearest-upsampled top-down adds, 3x3 smoothing; returns a tuple of levels."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.backbone = Backbone()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in (8, 16, 24))
        self.smooth = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        c3, c4, c5 = self.backbone(x)
        p5 = self.lateral[2](c5)
        p4 = self.lateral[1](c4) + F.interpolate(p5, size=c4.shape[-2:], mode="nearest")
        p3 = self.lateral[0](c3) + F.interpolate(p4, scale_factor=2.0, mode="nearest")
        return tuple(smooth(p) for smooth, p in zip(self.smooth, (p3, p4, p5), strict=True))


class WeightedFusion(nn.Module):
    """BiFPN's fast normalised fusion: learned non-negative scalar weights, normalised, then a depthwise-separable conv."""

    def __init__(self, inputs: int, width: int):
        super().__init__()
        self.w = nn.Parameter(torch.ones(inputs))
        self.dw = nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False)
        self.pw = nn.Conv2d(width, width, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        w = F.relu(self.w)
        w = w / (w.sum() + 1e-4)
        fused = sum(w[i] * x for i, x in enumerate(xs))
        return self.bn(self.pw(self.dw(F.silu(fused))))


class BiFPN(nn.Module):
    """BiFPN layer: top-down then bottom-up paths of weighted fusions (EfficientDet's neck)."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.backbone = Backbone()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in (8, 16, 24))
        self.td4, self.td3 = WeightedFusion(2, width), WeightedFusion(2, width)
        self.out4, self.out5 = WeightedFusion(3, width), WeightedFusion(2, width)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        p3, p4, p5 = (lat(c) for lat, c in zip(self.lateral, self.backbone(x), strict=True))
        td4 = self.td4(p4, F.interpolate(p5, scale_factor=2.0))
        out3 = self.td3(p3, F.interpolate(td4, scale_factor=2.0))
        out4 = self.out4(p4, td4, F.max_pool2d(out3, 3, 2, 1))
        out5 = self.out5(p5, F.max_pool2d(out4, 3, 2, 1))
        return [out3, out4, out5]


class HRNetFusion(nn.Module):
    """HRNet-style exchange: a high- and a low-resolution branch, each fused into the other (upsample / strided conv)."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8, stride=2)
        self.to_low = conv_bn(8, 16, stride=2)
        self.high = nn.Sequential(conv_bn(8, 8), conv_bn(8, 8))
        self.low = nn.Sequential(conv_bn(16, 16), conv_bn(16, 16))
        self.low_to_high = nn.Sequential(nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.high_to_low = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Conv2d(24, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        high = self.stem(x)
        low = self.to_low(high)
        high, low = self.high(high), self.low(low)
        up = F.interpolate(self.low_to_high(low), scale_factor=2, mode="nearest")
        high, low = F.relu(high + up), F.relu(low + self.high_to_low(high))
        return self.head(torch.cat([high, F.interpolate(low, size=high.shape[2:], mode="bilinear")], 1))


class Res2Net(nn.Module):
    """Res2Net bottleneck: 1x1 conv, split into 4 scales, hierarchical 3x3 convs with adds, cat, 1x1 conv, residual."""

    def __init__(self, width: int = 16, scales: int = 4):
        super().__init__()
        self.stem = conv_bn(3, width)
        self.reduce = conv_bn(width, width, 1)
        self.convs = nn.ModuleList(conv_bn(width // scales, width // scales) for _ in range(scales - 1))
        self.expand = nn.Sequential(nn.Conv2d(width, width, 1, bias=False), nn.BatchNorm2d(width))
        self.scale = width // scales

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        parts = torch.split(self.reduce(x), self.scale, dim=1)
        outs, y = [], None
        for i, conv in enumerate(self.convs):
            y = conv(parts[i] if y is None else parts[i] + y)
            outs.append(y)
        outs.append(parts[-1])
        return F.relu(self.expand(torch.cat(outs, dim=1)) + x)


class GhostModule(nn.Module):
    """GhostNet module: a primary conv, cheap depthwise 'ghost' features, concatenated and sliced to `out` channels."""

    def __init__(self, c_in: int, out: int, ratio: int = 2):
        super().__init__()
        self.out = out
        init = -(-out // ratio)
        self.primary = conv_bn(c_in, init, 1)
        self.cheap = nn.Sequential(nn.Conv2d(init, init * (ratio - 1), 3, 1, 1, groups=init, bias=False),
                                   nn.BatchNorm2d(init * (ratio - 1)), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.primary(x)
        return torch.cat([x1, self.cheap(x1)], dim=1)[:, : self.out, :, :]


class GhostNet(nn.Module):
    """GhostNet bottleneck: two ghost modules around a depthwise conv, with a residual."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 12, stride=2)
        self.ghost1 = GhostModule(12, 23)
        self.dw = nn.Sequential(nn.Conv2d(23, 23, 3, 1, 1, groups=23, bias=False), nn.BatchNorm2d(23))
        self.ghost2 = GhostModule(23, 12)
        self.fc = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.ghost2(self.dw(self.ghost1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class RepVGGBlock(nn.Module):
    """RepVGG training-time block: 3x3 conv-BN + 1x1 conv-BN + identity BN, summed, ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.dense = nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out))
        self.one = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False), nn.BatchNorm2d(c_out))
        self.identity = nn.BatchNorm2d(c_in) if c_in == c_out and stride == 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dense(x) + self.one(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return F.relu(out)


class RepVGG(nn.Module):
    """RepVGG: a stack of multi-branch RepVGG blocks and a linear classifier."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(RepVGGBlock(3, 16, 2), RepVGGBlock(16, 16), RepVGGBlock(16, 24, 2),
                                    RepVGGBlock(24, 24))
        self.fc = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(x).mean(dim=(2, 3)))


class CBAM(nn.Module):
    """CBAM: channel attention (shared MLP over avg- and max-pooled maps), then spatial attention over channel
    mean and max (those reductions pin the space they read)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 16), conv_bn(16, 16))
        self.mlp = nn.Sequential(nn.Conv2d(16, 4, 1), nn.ReLU(), nn.Conv2d(4, 16, 1))
        self.spatial = nn.Conv2d(2, 1, 7, padding=3)
        self.head = nn.Conv2d(16, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x * torch.sigmoid(self.mlp(F.adaptive_avg_pool2d(x, 1)) + self.mlp(F.adaptive_max_pool2d(x, 1)))
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.max(dim=1, keepdim=True)[0]], dim=1)
        x = x * torch.sigmoid(self.spatial(pooled))
        return self.head(x)


class SEResNet(nn.Module):
    """Squeeze-and-excitation residual block: global pool, two Linear layers, sigmoid gate, then the residual add."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.stem = conv_bn(3, width)
        self.body = nn.Sequential(conv_bn(width, width), nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width))
        self.fc1, self.fc2 = nn.Linear(width, width // 4), nn.Linear(width // 4, width)
        self.fc = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.body(x)
        b, c, _, _ = y.size()
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(y.mean((2, 3)))))).view(b, c, 1, 1)
        x = F.relu(x + y * s)
        return self.fc(F.adaptive_avg_pool2d(x, 1).view(b, -1))


class NonLocal(nn.Module):
    """Non-local block: theta/phi/g 1x1 convs, bmm affinity with a softmax over positions, bmm, output conv, residual."""

    def __init__(self, width: int = 16, inner: int = 8):
        super().__init__()
        self.stem = conv_bn(3, width, stride=2)
        self.theta, self.phi, self.g = (nn.Conv2d(width, inner, 1) for _ in range(3))
        self.out = nn.Sequential(nn.Conv2d(inner, width, 1), nn.BatchNorm2d(width))
        self.head = nn.Conv2d(width, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        n, _, h, w = x.shape
        theta = self.theta(x).view(n, -1, h * w).permute(0, 2, 1)
        phi = self.phi(x).view(n, -1, h * w)
        attn = F.softmax(torch.bmm(theta, phi), dim=-1)
        g = self.g(x).view(n, -1, h * w).permute(0, 2, 1)
        y = torch.bmm(attn, g).permute(0, 2, 1).contiguous().view(n, -1, h, w)
        return self.head(x + self.out(y))


class ESPCN(nn.Module):
    """ESPCN super-resolution: convs to 3 * r^2 channels, then PixelShuffle(r) to a 3-channel image r times larger."""

    def __init__(self, r: int = 2):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 5, padding=2), nn.Tanh(), nn.Conv2d(16, 8, 3, padding=1), nn.Tanh())
        self.to_pixels = nn.Conv2d(8, 3 * r * r, 3, padding=1)
        self.shuffle = nn.PixelShuffle(r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.shuffle(self.to_pixels(self.body(x))))


class GroupNormNet(nn.Module):
    """GroupNorm network (detection/segmentation heads): conv-GN-ReLU blocks with 4 groups and a residual."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.GroupNorm(4, 16), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1), nn.GroupNorm(4, 16), nn.ReLU(),
                                   nn.Conv2d(16, 16, 3, 1, 1), nn.GroupNorm(4, 16))
        self.head = nn.Conv2d(16, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.head(F.relu(x + self.block(x)))


class InstanceNormNet(nn.Module):
    """Style-transfer style net: conv / InstanceNorm(affine) / ReLU, a residual block, upsample back, tanh."""

    def __init__(self):
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.InstanceNorm2d(16, affine=True), nn.ReLU())
        self.res = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1), nn.InstanceNorm2d(16, affine=True), nn.ReLU(),
                                 nn.Conv2d(16, 16, 3, 1, 1), nn.InstanceNorm2d(16, affine=True))
        self.up = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(16, 8, 3, 1, 1),
                                nn.InstanceNorm2d(8), nn.ReLU(), nn.Conv2d(8, 3, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.down(x)
        return torch.tanh(self.up(y + self.res(y)))


class Audio1D(nn.Module):
    """1-D conv audio classifier: Conv1d-BN1d-ReLU stack with strides, a residual, global average, Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(1, 16, 9, stride=4, padding=4), nn.BatchNorm1d(16), nn.ReLU())
        self.block = nn.Sequential(nn.Conv1d(16, 16, 3, padding=1), nn.BatchNorm1d(16), nn.ReLU(),
                                   nn.Conv1d(16, 16, 3, padding=1), nn.BatchNorm1d(16))
        self.down = nn.Sequential(nn.Conv1d(16, 24, 3, stride=2, padding=1), nn.BatchNorm1d(24), nn.ReLU())
        self.fc = nn.Linear(24, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.down(F.relu(x + self.block(x)))
        return self.fc(x.mean(-1))


class Video3D(nn.Module):
    """3-D conv video net: Conv3d-BN3d stem, a residual 3x3x3 block, AdaptiveAvgPool3d, Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(3, 8, (3, 5, 5), (1, 2, 2), (1, 2, 2), bias=False), nn.BatchNorm3d(8),
                                  nn.ReLU(inplace=True))
        self.block = nn.Sequential(nn.Conv3d(8, 8, 3, padding=1, bias=False), nn.BatchNorm3d(8), nn.ReLU(inplace=True),
                                   nn.Conv3d(8, 8, 3, padding=1, bias=False), nn.BatchNorm3d(8))
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = F.relu(x + self.block(x))
        return self.fc(self.pool(x).flatten(1))


@functools.cache
def zoo() -> dict[str, Entry]:
    """Every zoo model by name: this file's, `user_cnns_more.MORE` and `user_cnns_idioms.IDIOMS`."""
    image = ((2, 3, 32, 32),)
    first = [Entry("unet", UNet, image), Entry("fpn", FPN, image), Entry("bifpn", BiFPN, image),
             Entry("hrnet_fusion", HRNetFusion, image), Entry("res2net", Res2Net, ((2, 3, 16, 16),)),
             Entry("ghostnet", GhostNet, image), Entry("repvgg", RepVGG, image), Entry("cbam", CBAM, ((2, 3, 16, 16),)),
             Entry("se_resnet", SEResNet, ((2, 3, 16, 16),)), Entry("non_local", NonLocal, ((2, 3, 16, 16),)),
             Entry("espcn", ESPCN, ((2, 3, 16, 16),)), Entry("groupnorm", GroupNormNet, image),
             Entry("instancenorm", InstanceNormNet, image), Entry("audio_1d", Audio1D, ((2, 1, 512),)),
             Entry("video_3d", Video3D, ((2, 3, 4, 16, 16),))]
    return {e.name: e for e in first + MORE + IDIOMS}
