"""Independent PyTorch references of the released layouts (MobileNetV2 + CA, MobileNeXt).

Written from facts about the released models (their papers and checkpoints' layouts), not from
upstream code. Module indices mirror the released `nn.Sequential`s, so `state_dict()` keys equal
the released checkpoints' keys (the tests check them against tests/data/reference/*.keys.tsv).
`build` makes a model, `randomize` gives it random weights and calibrated BatchNorm statistics;
the parity tests and `ca_flax.bench` use them. Needs PyTorch (`pip install -e '.[convert]'`);
`ca_flax.convert` itself does not import this module, so it stays importable without torch.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def divisible(v: float, d: int = 8) -> int:
    r = max(d, int(v + d / 2) // d * d)
    return r + d if r < 0.9 * v else r


class HSwish(nn.Module):
    def forward(self, x):
        return x * nn.functional.relu6(x + 3) / 6


class CoordAtt(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        mip = max(8, c // 32)
        self.conv1 = nn.Conv2d(c, mip, 1)
        self.bn1 = nn.BatchNorm2d(mip)
        self.act = HSwish()
        self.conv2 = nn.Conv2d(mip, c, 1)
        self.conv3 = nn.Conv2d(mip, c, 1)

    def forward(self, x):
        h, w = x.shape[2], x.shape[3]
        x_h = x.mean(dim=3, keepdim=True)  # N C H 1
        x_w = x.mean(dim=2, keepdim=True).permute(0, 1, 3, 2)  # N C W 1
        y = self.act(self.bn1(self.conv1(torch.cat([x_h, x_w], dim=2))))
        y_h, y_w = torch.split(y, [h, w], dim=2)
        a_h = torch.sigmoid(self.conv2(y_h))
        a_w = torch.sigmoid(self.conv3(y_w.permute(0, 1, 3, 2)))
        return x * a_h * a_w


def dw(c: int, s: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c, c, 3, s, 1, groups=c, bias=False)


def pw(i: int, o: int) -> nn.Conv2d:
    return nn.Conv2d(i, o, 1, bias=False)


class MBV2Block(nn.Module):
    def __init__(self, inp: int, oup: int, s: int, t: int, ca: bool):
        super().__init__()
        hid = round(inp * t)
        self.res = s == 1 and inp == oup
        if t == 1:
            layers = [
                dw(hid, s),
                nn.BatchNorm2d(hid),
                nn.ReLU6(),
                pw(hid, oup),
                nn.BatchNorm2d(oup),
            ]
        else:
            layers = [pw(inp, hid), nn.BatchNorm2d(hid), nn.ReLU6(), dw(hid, s)]
            layers += [nn.BatchNorm2d(hid), nn.ReLU6()]
            layers += [CoordAtt(hid)] if ca else []
            layers += [pw(hid, oup), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.res else self.conv(x)


class MBV2(nn.Module):
    def __init__(self, width: float = 1.0, ca: bool = True, num_classes: int = 1000):
        super().__init__()
        settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2)]
        settings += [(6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
        c = divisible(32 * width)
        feats = [nn.Sequential(nn.Conv2d(3, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU6())]
        for t, co, n, s in settings:
            o = divisible(co * width)
            for i in range(n):
                feats.append(MBV2Block(c, o, s if i == 0 else 1, t, ca))
                c = o
        self.features = nn.Sequential(*feats)
        last = divisible(1280 * width) if width > 1.0 else 1280
        self.conv = nn.Sequential(pw(c, last), nn.BatchNorm2d(last), nn.ReLU6())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.1), nn.Linear(last, num_classes))

    def forward(self, x):
        x = self.avgpool(self.conv(self.features(x))).flatten(1)
        return self.classifier(x)


class SandGlass(nn.Module):
    def __init__(self, inp: int, oup: int, s: int, t: int, keep3x3: bool, ca: bool):
        super().__init__()
        hid = inp // t
        if hid < oup / 6.0:
            hid = divisible(math.ceil(oup / 6.0), 16)
        self.res = inp == oup and s == 1 and not keep3x3
        full = t == 2 or inp == oup or keep3x3
        layers = []
        if full:
            layers += [dw(inp), nn.BatchNorm2d(inp), nn.ReLU6()]
            layers += [CoordAtt(inp)] if ca else []
        layers += [pw(inp, hid), nn.BatchNorm2d(hid), pw(hid, oup), nn.BatchNorm2d(oup), nn.ReLU6()]
        if full or s == 2:
            layers += [dw(oup, s), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.res else self.conv(x)


class MobileNeXt(nn.Module):
    def __init__(self, width: float = 1.0, ca: bool = False, num_classes: int = 1000):
        super().__init__()
        settings = [(2, 96, 1, 2), (6, 144, 1, 1), (6, 192, 3, 2), (6, 288, 3, 2)]
        settings += [(6, 384, 4, 1), (6, 576, 4, 2), (6, 960, 3, 1), (6, 1280, 1, 1)]
        c = divisible(32 * width)
        feats = [nn.Sequential(nn.Conv2d(3, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU6())]
        for t, co, n, s in settings:
            o = co if (co == 1280 and width < 1.0) else divisible(co * width)
            for i in range(n):
                first = i == 0
                feats.append(SandGlass(c, o, s if first else 1, t, first and n == 1 and s == 1, ca))
                c = o
        self.features = nn.Sequential(*feats)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(c, num_classes))

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


def build(name: str, width: float = 1.0, num_classes: int = 1000) -> nn.Module:
    """Reference for the ca_flax model `name` (only layouts without SE/CBAM)."""
    family, _, attention = name.partition("_")
    cls = {"mobilenetv2": MBV2, "mobilenext": MobileNeXt}[family]
    return cls(width=width, ca=attention == "ca", num_classes=num_classes)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and realistic BatchNorm statistics, so conversion errors show in logits.

    Running statistics are calibrated on random images (as a trained network's would be), so
    activations stay O(1) through the depth and float32 rounding stays far below tolerances.
    """
    g = torch.Generator().manual_seed(seed)
    _random_weights(model, g)
    was_training = model.training
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, 96, 96, generator=g))
    for m in bns:
        m.momentum = 0.1
        m.num_batches_tracked.zero_()
    return model.train(was_training)


def _random_weights(model: nn.Module, g: torch.Generator) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2.0 / fan_in))
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(1 + 0.2 * torch.randn(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
            elif isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / math.sqrt(m.in_features))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
