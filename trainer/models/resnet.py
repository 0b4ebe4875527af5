"""ImageNet-style ResNets (18, 34, 50, 101, 152).

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, table 1: a 7x7 stride-2
conv stem with 3x3 max pooling, four stages of basic (18, 34) or bottleneck (50+) blocks with
64, 128, 256, 512 base filters, stride 2 at the first block of stages 2-4, projection shortcuts
(1x1 conv + norm) where the shape changes, global average pooling and a linear classifier.
Post-activation blocks as in the paper (stride on the 3x3 conv of the bottleneck, as in
torchvision's "ResNet v1.5").
Under ``model.norm_order=act_norm`` every block site is ReLU -> norm (after the addition for the
last one); a projection shortcut keeps conv -> norm, there being no activation on that path.
"""

from __future__ import annotations

from torch import Tensor, nn

from trainer.model_rules import RESNET_LAYOUT, resnet_depth_problem
from trainer.models.norms import NormSites, activation_after, init_weights, site

LAYOUT = RESNET_LAYOUT


class Projection(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norms: NormSites):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
        self.norm = norms.inner(cout, self.conv)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x))


def _shortcut(cin: int, cout: int, stride: int, norms: NormSites) -> nn.Module:
    return Projection(cin, cout, stride, norms) if stride != 1 or cin != cout else nn.Identity()


class Basic(nn.Module):
    expansion = 1

    def __init__(self, cin: int, mid: int, stride: int, norms: NormSites):
        super().__init__()
        self.act_first = norms.act_first
        self.conv1 = nn.Conv2d(cin, mid, 3, stride=stride, padding=1, bias=False)
        self.norm1 = norms.inner(mid, self.conv1)
        self.act1 = activation_after(self.norm1)
        self.conv2 = nn.Conv2d(mid, mid, 3, padding=1, bias=False)
        self.norm2 = norms.inner(mid, self.conv2)
        self.act2 = activation_after(self.norm2)
        self.shortcut = _shortcut(cin, mid, stride, norms)

    def forward(self, x: Tensor) -> Tensor:
        out = site(self.conv1(x), self.norm1, self.act1, self.act_first)
        if self.act_first:
            return self.norm2(self.act2(self.conv2(out) + self.shortcut(x)))
        return self.act2(self.norm2(self.conv2(out)) + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, mid: int, stride: int, norms: NormSites):
        super().__init__()
        self.act_first = norms.act_first
        cout = mid * self.expansion
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.norm1 = norms.inner(mid, self.conv1)
        self.act1 = activation_after(self.norm1)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False)
        self.norm2 = norms.inner(mid, self.conv2)
        self.act2 = activation_after(self.norm2)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.norm3 = norms.inner(cout, self.conv3)
        self.act3 = activation_after(self.norm3)
        self.shortcut = _shortcut(cin, cout, stride, norms)

    def forward(self, x: Tensor) -> Tensor:
        out = site(self.conv1(x), self.norm1, self.act1, self.act_first)
        out = site(self.conv2(out), self.norm2, self.act2, self.act_first)
        if self.act_first:
            return self.norm3(self.act3(self.conv3(out) + self.shortcut(x)))
        return self.act3(self.norm3(self.conv3(out)) + self.shortcut(x))


class ResNet(nn.Module):
    @staticmethod
    def depth_problem(depth: int) -> str | None:
        """Why ``depth`` is not one of the published depths (``LAYOUT``), or None."""
        return resnet_depth_problem(depth)

    def __init__(self, depth: int, num_classes: int, in_channels: int, width: int, norms: NormSites):
        super().__init__()
        problem = self.depth_problem(depth)
        if problem:
            raise ValueError(f"ResNet {problem}")
        kind, counts = LAYOUT[depth]
        block = Basic if kind == "basic" else Bottleneck
        self.stem = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.stem_norm = norms.inner(width, self.stem)
        self.stem_act = activation_after(self.stem_norm)
        self.act_first = norms.act_first
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        blocks: list[nn.Module] = []
        cin = width
        for stage, count in enumerate(counts):
            mid = width * 2**stage
            for i in range(count):
                blocks.append(block(cin, mid, 2 if stage > 0 and i == 0 else 1, norms))
                cin = mid * block.expansion
        self.blocks = nn.Sequential(*blocks)
        last_conv = blocks[-1].conv3 if kind == "bottleneck" else blocks[-1].conv2
        self.final_norm = norms.added_final(cin, last_conv)
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(site(self.stem(x), self.stem_norm, self.stem_act, self.act_first))
        x = self.final_norm(self.blocks(x))
        return self.fc(x.mean(dim=(2, 3)))
