"""Human-part parser in the SCHP / CE2P layout (ResNet-101 + PSP context + edge-aware fusion), LIP's 20 classes.

The module names and parameter shapes follow the released SCHP checkpoints
(`exp-schp-201908261155-lip.pth`), so their `state_dict` loads strictly; the
activated batch norm of those checkpoints is plain batch norm + leaky ReLU at
inference. Input: RGB in [0, 1]; the model normalizes as SCHP does (BGR order,
its mean/std). Output: per-pixel logits over the 20 LIP classes.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

NUM_LIP_CLASSES = 20
INPUT_SIZE = 473  # SCHP's LIP resolution
_MEAN_BGR = (0.406, 0.456, 0.485)
_STD_BGR = (0.225, 0.224, 0.229)


class ActivatedBatchNorm(nn.Module):
    """Batch norm followed by leaky ReLU(0.01), with the same four tensors as InPlaceABN."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1, 1e-5)
        return F.leaky_relu(x, 0.01)


def conv_abn(cin: int, cout: int, kernel: int = 1, padding: int = 0) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=padding, bias=False), ActivatedBatchNorm(cout))


class Bottleneck(nn.Module):
    """ResNet bottleneck (1x1, 3x3 dilated, 1x1) with an optional projection shortcut."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


def _layer(cin: int, width: int, blocks: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    layers = [Bottleneck(cin, width, stride, dilation)]
    layers += [Bottleneck(width * 4, width, 1, dilation) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class PyramidPooling(nn.Module):
    """PSP context: pooled features at 1/2/3/6 bins, upsampled and fused with the input."""

    def __init__(self, cin: int = 2048, cout: int = 512, bins: tuple[int, ...] = (1, 2, 3, 6)):
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), nn.Conv2d(cin, cout, 1, bias=False), ActivatedBatchNorm(cout))
            for b in bins
        )
        self.bottleneck = conv_abn(cin + len(bins) * cout, cout, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [F.interpolate(s(x), size=size, mode="bilinear", align_corners=True) for s in self.stages]
        return self.bottleneck(torch.cat([*pooled, x], 1))


class EdgeBranch(nn.Module):
    """Edge logits from three backbone stages; its features feed the fusion head."""

    def __init__(self, cins: tuple[int, int, int] = (256, 512, 1024), mid: int = 256, out: int = 2):
        super().__init__()
        self.conv1, self.conv2, self.conv3 = (conv_abn(c, mid) for c in cins)
        self.conv4 = nn.Conv2d(mid, out, 3, padding=1)
        self.conv5 = nn.Conv2d(out * 3, out, 1)

    def forward(self, x1, x2, x3):
        size = x1.shape[-2:]
        feats = [self.conv1(x1), self.conv2(x2), self.conv3(x3)]
        edges = [self.conv4(f) for f in feats]
        up = lambda t: F.interpolate(t, size=size, mode="bilinear", align_corners=True)  # noqa: E731
        edge = self.conv5(torch.cat([edges[0], *map(up, edges[1:])], 1))
        return edge, torch.cat([feats[0], *map(up, feats[1:])], 1)


class ParsingDecoder(nn.Module):
    """Context features upsampled to layer1's resolution and fused with its low-level features."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.conv1 = conv_abn(512, 256)
        self.conv2 = conv_abn(256, 48)
        self.conv3 = nn.Sequential(*conv_abn(304, 256), *conv_abn(256, 256))
        self.conv4 = nn.Conv2d(256, num_classes, 1)

    def forward(self, context, low):
        context = F.interpolate(self.conv1(context), size=low.shape[-2:], mode="bilinear", align_corners=True)
        x = self.conv3(torch.cat([context, self.conv2(low)], 1))
        return self.conv4(x), x


class HumanParser(nn.Module):
    """SCHP-layout parser; `forward` returns the fused parsing logits at the input resolution."""

    def __init__(self, num_classes: int = NUM_LIP_CLASSES, blocks: tuple[int, ...] = (3, 4, 23, 3)):
        super().__init__()
        # Deep stem: three 3x3 convs instead of one 7x7.
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 3, 2, 1, bias=False), nn.BatchNorm2d(64)
        self.conv2, self.bn2 = nn.Conv2d(64, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64)
        self.conv3, self.bn3 = nn.Conv2d(64, 128, 3, 1, 1, bias=False), nn.BatchNorm2d(128)
        self.layer1 = _layer(128, 64, blocks[0])
        self.layer2 = _layer(256, 128, blocks[1], stride=2)
        self.layer3 = _layer(512, 256, blocks[2], stride=2)
        self.layer4 = _layer(1024, 512, blocks[3], dilation=2)
        self.context_encoding = PyramidPooling()
        self.edge = EdgeBranch()
        self.decoder = ParsingDecoder(num_classes)
        self.fushion = nn.Sequential(  # (sic) the checkpoints' spelling
            *conv_abn(1024, 256), nn.Dropout2d(0.1), nn.Conv2d(256, num_classes, 1)
        )
        self.register_buffer("mean", torch.tensor(_MEAN_BGR).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD_BGR).view(1, 3, 1, 1), persistent=False)

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        """rgb: [B, 3, H, W] in [0, 1] -> logits [B, 20, H, W]."""
        size = rgb.shape[-2:]
        x = (rgb.flip(1) - self.mean) / self.std
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.max_pool2d(F.relu(self.bn3(self.conv3(x))), 3, 2, 1)
        x2 = self.layer1(x)
        x3 = self.layer2(x2)
        x4 = self.layer3(x3)
        context = self.context_encoding(self.layer4(x4))
        _, parsing_feats = self.decoder(context, x2)
        _, edge_feats = self.edge(x2, x3, x4)
        logits = self.fushion(torch.cat([parsing_feats, edge_feats], 1))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)


def load_human_parser(weights: str | Path | None, blocks: tuple[int, ...] = (3, 4, 23, 3)) -> HumanParser:
    """A parser with SCHP weights from a checkpoint path; None gives random weights (tests, smoke runs)."""
    model = HumanParser(blocks=blocks)
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"human parser weights not found: {path} (segment.human.weights)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        state = {k.removeprefix("module."): v for k, v in state.items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise ValueError(f"{path}: not an SCHP LIP checkpoint: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()
