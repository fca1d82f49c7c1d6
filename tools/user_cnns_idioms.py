"""The Python idioms of the user-style CNN zoo (`user_cnns.zoo()` lists them): two inputs, dict and list outputs,
functional convs, tied weights, stochastic layers, a branch on the input's shape, torch.roll and in-place ops."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from user_cnns_entry import Entry, conv_bn


class Siamese(nn.Module):
    """Siamese network: one shared encoder applied to two inputs, |a - b| of the embeddings, a Linear head."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(conv_bn(3, 8, stride=2), conv_bn(8, 16, stride=2), nn.AdaptiveAvgPool2d(1),
                                     nn.Flatten(), nn.Linear(16, 12))
        self.head = nn.Linear(12, 1)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.head(torch.abs(self.encoder(a) - self.encoder(b)))


class DetectionHead(nn.Module):
    """Multi-level detection head: one shared conv tower over a list of levels, returning a dict of lists."""

    def __init__(self, c: int = 16, anchors: int = 3, classes: int = 4):
        super().__init__()
        self.levels = nn.ModuleList([conv_bn(3, c, stride=2), conv_bn(c, c, stride=2)])
        self.tower = nn.Sequential(conv_bn(c, c), conv_bn(c, c))
        self.cls = nn.Conv2d(c, anchors * classes, 3, padding=1)
        self.box = nn.Conv2d(c, anchors * 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        out: dict[str, list[torch.Tensor]] = {"cls": [], "box": []}
        for level in self.levels:
            x = level(x)
            t = self.tower(x)
            out["cls"].append(self.cls(t))
            out["box"].append(self.box(t).flatten(2))
        return out


class BlurNet(nn.Module):
    """Anti-aliased downsampling (BlurPool): a fixed binomial filter buffer applied by F.conv2d with literal groups."""

    def __init__(self, c: int = 16):
        super().__init__()
        self.c = c
        self.stem = conv_bn(3, c)
        taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
        self.register_buffer("blur", (taps[:, None] * taps[None, :] / 64.0).repeat(c, 1, 1, 1))
        self.conv = conv_bn(c, 24)
        self.fc = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = F.conv2d(F.pad(x, [1, 2, 1, 2], mode="reflect"), self.blur, stride=2, groups=16)
        return self.fc(self.conv(x).mean((2, 3)))


class TiedAutoencoder(nn.Module):
    """Convolutional autoencoder whose decoder reuses the encoder's weights (a conv and a ConvTranspose share one)."""

    def __init__(self):
        super().__init__()
        self.enc1 = nn.Conv2d(3, 16, 3, 2, 1)
        self.enc2 = nn.Conv2d(16, 8, 3, 2, 1)
        self.dec2 = nn.ConvTranspose2d(8, 16, 3, 2, 1, output_padding=1)
        self.dec2.weight = self.enc2.weight
        self.dec1 = nn.ConvTranspose2d(16, 3, 3, 2, 1, output_padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.enc1(x))
        return torch.sigmoid(self.dec1(F.relu(self.dec2(F.relu(self.enc2(h))))))


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth as users copy it: drop whole samples of a residual branch while training."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0], 1, 1, 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


class DropNet(nn.Module):
    """Residual blocks with drop-path, Dropout2d on a feature map and functional dropout before the classifier."""

    def __init__(self, c: int = 16):
        super().__init__()
        self.stem = conv_bn(3, c, stride=2)
        self.blocks = nn.ModuleList(nn.Sequential(conv_bn(c, c), nn.Dropout2d(0.1), nn.Conv2d(c, c, 3, 1, 1))
                                    for _ in range(2))
        self.fc = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = F.relu(x + drop_path(block(x), 0.2, self.training))
        return self.fc(F.dropout(x.mean((2, 3)), 0.3, self.training))


class ShapeBranch(nn.Module):
    """A branch on the input's size at the root (`if x.shape[-1] > 32`): traced specialised to the example inputs."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.big = conv_bn(16, 16, stride=2)
        self.small = conv_bn(16, 16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 32:
            x = F.avg_pool2d(x, 2)
        x = self.stem(x)
        x = self.big(x) if x.shape[-1] >= 16 else self.small(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class RollNet(nn.Module):
    """Channel mixing by torch.roll over the channel dim (a shift-style block), added back to its input."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.mix = conv_bn(16, 16, 1)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.head(x + self.mix(torch.roll(x, shifts=3, dims=1)))


class InplaceNet(nn.Module):
    """In-place ops users write to save memory: torch.relu_, x += y, mul_ by a scalar."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu_(self.conv1(x))
        y = self.bn(self.conv2(x))
        y += x
        y.mul_(0.5)
        return self.fc(torch.relu_(y).mean((2, 3)))


IDIOMS = [Entry("siamese", Siamese, ((2, 3, 16, 16), (2, 3, 16, 16))),
          Entry("detection_head", DetectionHead, ((2, 3, 32, 32),)), Entry("blurpool", BlurNet, ((2, 3, 16, 16),)),
          Entry("tied_autoencoder", TiedAutoencoder, ((2, 3, 16, 16),)), Entry("dropout_droppath", DropNet,
                                                                                   ((4, 3, 16, 16),)),
          Entry("shape_branch", ShapeBranch, ((2, 3, 32, 32),)), Entry("roll_channels", RollNet, ((2, 3, 16, 16),)),
          Entry("inplace_relu", InplaceNet, ((2, 3, 16, 16),))]
