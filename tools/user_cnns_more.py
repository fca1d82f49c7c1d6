"""The second half of the user-style CNN zoo (`user_cnns.zoo()` lists both): recurrent heads, detection blocks,
mobile blocks, multi-branch blocks and the Python constructs users reach for (tied weights, functional convs,
dropout, shape branches, in-place ops)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from user_cnns_entry import Entry, conv_bn


class CRNN(nn.Module):
    """CRNN text recogniser: conv stack, height pooled away, a bidirectional LSTM over the width, a Linear per step."""

    def __init__(self, classes: int = 11):
        super().__init__()
        self.convs = nn.Sequential(conv_bn(1, 8), nn.MaxPool2d(2), conv_bn(8, 16), nn.MaxPool2d((2, 1)), conv_bn(16, 16))
        self.rnn = nn.LSTM(16, 12, batch_first=True, bidirectional=True)
        self.out = nn.Linear(24, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.convs(x)  # (n, c, h, w)
        f = F.adaptive_avg_pool2d(f, (1, f.shape[-1])).squeeze(2).permute(0, 2, 1)  # (n, w, c)
        seq, _ = self.rnn(f)
        return self.out(seq).log_softmax(-1)


class GRUHead(nn.Module):
    """Conv features read by a GRU over the width (a CRNN with a GRU): the last step's hidden state classifies."""

    def __init__(self):
        super().__init__()
        self.convs = nn.Sequential(conv_bn(3, 12, stride=2), conv_bn(12, 16))
        self.gru = nn.GRU(16, 10, batch_first=True)
        self.fc = nn.Linear(10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.convs(x).mean(dim=2).transpose(1, 2)
        _, h = self.gru(f)
        return self.fc(h[-1])


class CSPBlock(nn.Module):
    """YOLO-style C2f/CSP block: a 1x1 conv chunked in two, bottlenecks on one half, every stage concatenated, then an
    SPPF (three chained max pools concatenated)."""

    def __init__(self, c: int = 16, n: int = 2):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, c, stride=2))
        self.cv1 = conv_bn(c, c, 1)
        self.m = nn.ModuleList(nn.Sequential(conv_bn(c // 2, c // 2), conv_bn(c // 2, c // 2)) for _ in range(n))
        self.cv2 = conv_bn((2 + n) * (c // 2), c, 1)
        self.sppf_in, self.sppf_out = conv_bn(c, c // 2, 1), conv_bn(4 * (c // 2), c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(self.stem(x)).chunk(2, 1))
        for m in self.m:
            y.append(y[-1] + m(y[-1]))
        x = self.sppf_in(self.cv2(torch.cat(y, 1)))
        p1 = F.max_pool2d(x, 5, 1, 2)
        p2 = F.max_pool2d(p1, 5, 1, 2)
        return self.sppf_out(torch.cat([x, p1, p2, F.max_pool2d(p2, 5, 1, 2)], 1))


class NetVLAD(nn.Module):
    """NetVLAD place-recognition head: soft-assignment 1x1 conv, softmax over clusters, residuals to learned
    centroids, intra- and L2-normalisation (the descriptor space is pinned by the centroids)."""

    def __init__(self, dim: int = 16, clusters: int = 4):
        super().__init__()
        self.features = nn.Sequential(conv_bn(3, 12, stride=2), conv_bn(12, dim))
        self.assign = nn.Conv2d(dim, clusters, 1)
        self.centroids = nn.Parameter(torch.rand(clusters, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.features(x), p=2, dim=1)
        n, c = x.shape[:2]
        soft = F.softmax(self.assign(x).view(n, self.centroids.shape[0], -1), dim=1)
        flat = x.view(n, c, -1)
        residual = flat.unsqueeze(1) - self.centroids.unsqueeze(0).unsqueeze(-1)  # (n, k, c, hw)
        vlad = (residual * soft.unsqueeze(2)).sum(dim=-1)
        vlad = F.normalize(vlad, p=2, dim=2).view(n, -1)
        return F.normalize(vlad, p=2, dim=1)


class InvertedResidual(nn.Module):
    """MobileNetV2 inverted residual: 1x1 expand, 3x3 depthwise, 1x1 linear projection, ReLU6, residual when it fits."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int = 4):
        super().__init__()
        hidden = c_in * expand
        self.use_res = stride == 1 and c_in == c_out
        self.conv = nn.Sequential(
            nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True), nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2-style stack of inverted residuals, dropout and a Linear classifier."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(conv_bn(3, 8, stride=2), InvertedResidual(8, 8, 1), InvertedResidual(8, 16, 2),
                                      InvertedResidual(16, 16, 1))
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's shuffle written by hand: view as (groups, c / groups), transpose, flatten back."""
    n, c, h, w = x.size()
    x = x.view(n, groups, c // groups, h, w)
    return torch.transpose(x, 1, 2).contiguous().view(n, -1, h, w)


class ShuffleNet(nn.Module):
    """ShuffleNetV2 unit: split the channels in two, a depthwise branch on one half, cat, channel shuffle."""

    def __init__(self, c: int = 16):
        super().__init__()
        self.stem = conv_bn(3, c, stride=2)
        self.branch = nn.Sequential(conv_bn(c // 2, c // 2, 1), nn.Conv2d(c // 2, c // 2, 3, 1, 1, groups=c // 2),
                                    nn.BatchNorm2d(c // 2), conv_bn(c // 2, c // 2, 1))
        self.head = nn.Conv2d(c, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x1, x2 = x.chunk(2, dim=1)
        return self.head(channel_shuffle(torch.cat((x1, self.branch(x2)), dim=1), 2))


class DenseNet(nn.Module):
    """DenseNet block: each layer's BN-ReLU-conv output concatenated to all before it, then a transition."""

    def __init__(self, growth: int = 6, layers: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(8 + i * growth), nn.ReLU(), nn.Conv2d(8 + i * growth, growth, 3, 1, 1, bias=False))
            for i in range(layers))
        width = 8 + layers * growth
        self.transition = nn.Sequential(nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, 12, 1), nn.AvgPool2d(2))
        self.fc = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [self.stem(x)]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.transition(torch.cat(features, 1)), 1), 1))


class SelectiveKernel(nn.Module):
    """SKNet selective kernel: 3x3 and dilated 3x3 branches stacked, fused by a softmax over the branches."""

    def __init__(self, c: int = 16):
        super().__init__()
        self.stem = conv_bn(3, c)
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, c, 3, 1, d, dilation=d, groups=4, bias=False), nn.BatchNorm2d(c), nn.ReLU())
            for d in (1, 2))
        self.fc = nn.Sequential(nn.Linear(c, 8), nn.ReLU())
        self.select = nn.Linear(8, 2 * c)
        self.head = nn.Conv2d(c, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        feats = torch.stack([b(x) for b in self.branches], dim=1)  # (n, 2, c, h, w)
        z = self.fc(feats.sum(1).mean((2, 3)))
        attn = F.softmax(self.select(z).view(x.shape[0], 2, -1, 1, 1), dim=1)
        return self.head((feats * attn).sum(1))


class ASPP(nn.Module):
    """DeepLabV3 ASPP: 1x1 and dilated 3x3 branches plus an image-pooling branch, concatenated and projected."""

    def __init__(self, c_in: int = 16, c: int = 8):
        super().__init__()
        self.backbone = nn.Sequential(conv_bn(3, 12, stride=2), conv_bn(12, c_in))
        self.branches = nn.ModuleList([conv_bn(c_in, c, 1)] + [
            nn.Sequential(nn.Conv2d(c_in, c, 3, padding=r, dilation=r, bias=False), nn.BatchNorm2d(c), nn.ReLU())
            for r in (2, 4)])
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c_in, c, 1, bias=False), nn.ReLU())
        self.project = nn.Sequential(conv_bn(4 * c, c, 1), nn.Dropout(0.1), nn.Conv2d(c, 3, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone(x)
        pooled = F.interpolate(self.image_pool(f), size=f.shape[-2:], mode="bilinear", align_corners=False)
        out = self.project(torch.cat([b(f) for b in self.branches] + [pooled], dim=1))
        return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)


class Inception(nn.Module):
    """Inception module: 1x1, 1x1->3x3, 1x1->5x5 and pool->1x1 branches concatenated."""

    def __init__(self, c_in: int = 12):
        super().__init__()
        self.stem = conv_bn(3, c_in, stride=2)
        self.b1 = conv_bn(c_in, 6, 1)
        self.b3 = nn.Sequential(conv_bn(c_in, 4, 1), conv_bn(4, 8))
        self.b5 = nn.Sequential(conv_bn(c_in, 4, 1), conv_bn(4, 6, 5))
        self.bp = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn(c_in, 4, 1))
        self.fc = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], 1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Fire(nn.Module):
    """SqueezeNet fire module: 1x1 squeeze, then 1x1 and 3x3 expands concatenated; the classifier a conv."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2), nn.ReLU(inplace=True))
        self.squeeze = nn.Sequential(nn.Conv2d(16, 4, 1), nn.ReLU(inplace=True))
        self.e1 = nn.Sequential(nn.Conv2d(4, 8, 1), nn.ReLU(inplace=True))
        self.e3 = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(inplace=True))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(16, 10, 1), nn.ReLU(inplace=True),
                                        nn.AdaptiveAvgPool2d(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.squeeze(self.stem(x))
        return torch.flatten(self.classifier(torch.cat([self.e1(s), self.e3(s)], 1)), 1)


class Xception(nn.Module):
    """Xception: depthwise-separable convs (depthwise 3x3 then pointwise 1x1) with a strided 1x1 shortcut."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 12)

        def separable(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_in, 3, 1, 1, groups=c_in, bias=False), nn.Conv2d(c_in, c_out, 1,
                                 bias=False), nn.BatchNorm2d(c_out))

        self.body = nn.Sequential(separable(12, 24), nn.ReLU(), separable(24, 24), nn.MaxPool2d(3, 2, 1))
        self.skip = nn.Sequential(nn.Conv2d(12, 24, 1, stride=2, bias=False), nn.BatchNorm2d(24))
        self.fc = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.body(x) + self.skip(x)
        return self.fc(F.adaptive_avg_pool2d(F.relu(x), 1).flatten(1))


MORE = [Entry("crnn_lstm", CRNN, ((2, 1, 16, 32),)), Entry("crnn_gru", GRUHead, ((2, 3, 16, 32),)),
        Entry("yolo_csp", CSPBlock, ((2, 3, 32, 32),)), Entry("netvlad", NetVLAD, ((2, 3, 16, 16),)),
        Entry("mobilenetv2", MobileNetV2, ((2, 3, 32, 32),)), Entry("shufflenet", ShuffleNet, ((2, 3, 32, 32),)),
        Entry("densenet", DenseNet, ((2, 3, 16, 16),)), Entry("selective_kernel", SelectiveKernel, ((2, 3, 16, 16),)),
        Entry("aspp", ASPP, ((2, 3, 32, 32),)), Entry("inception", Inception, ((2, 3, 32, 32),)),
        Entry("squeezenet_fire", Fire, ((2, 3, 32, 32),)), Entry("xception", Xception, ((2, 3, 16, 16),))]
