"""Small models exercising every op family the pass rewrites."""

import itertools

import torch
import torch.nn.functional as F
from torch import nn


class StdConv(nn.Conv2d):
    """Weight-standardized conv (as timm's StdConv2d): the weight is computed in forward."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Mixed(nn.Module):
    """Conv (grouped, depthwise, reflect padding, standardized), Conv1d/3d, Linear on N-D
    input, and a functional linear on a parameter."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2, bias=False)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, padding_mode="reflect")
        self.std = StdConv(8, 8, 1)
        self.conv1d = nn.Conv1d(8, 4, 3, padding=1)
        self.conv3d = nn.Conv3d(1, 2, 3, padding=1)
        self.tokens = nn.Linear(4, 6)
        self.head_weight = nn.Parameter(torch.randn(5, 6) * 0.3)
        self.head_bias = nn.Parameter(torch.zeros(5))

    def forward(self, x):
        x = F.relu(self.conv(x))
        x = F.relu(self.grouped(x))
        x = F.relu(self.depthwise(x))
        x = self.std(x)  # (n, 8, h, w)
        n, _c, _h, _w = x.shape
        seq = self.conv1d(x.flatten(2))  # (n, 4, h*w)
        vol = self.conv3d(seq.unsqueeze(1)[:, :, :, :4].reshape(n, 1, 4, 4, -1))
        t = self.tokens(seq.transpose(1, 2))  # linear on 3-D input
        t = t + vol.mean() * 0
        return F.linear(t.mean(1), self.head_weight, self.head_bias)


class MLP(nn.Sequential):
    def __init__(self, sizes=(20, 16, 12, 4)):
        layers = []
        for a, b in itertools.pairwise(sizes):
            layers += [nn.Linear(a, b), nn.ReLU()]
        super().__init__(*layers[:-1])
