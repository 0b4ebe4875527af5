"""CIFAR ResNets of depth 6n+2 and their pre-activation variant.

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, section 4.2: a 3x3 conv
stem, then three stages of n basic blocks with 16, 32, 64 filters on feature maps of 32, 16, 8
pixels (stride 2 at the first block of stages 2 and 3), global average pooling and a linear
classifier; identity shortcuts throughout, zero-padded when the width doubles ("option A").
He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016: the pre-activation block
norm -> ReLU -> conv -> norm -> ReLU -> conv, with a final norm -> ReLU before pooling.

The stride pattern works on any input of at least 4x4 pixels (8x8 digits give 8, 4, 2).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from trainer.model_rules import cifar_resnet_depth_problem
from trainer.models.norms import NormSites, activation_after, init_weights, site


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class PadShortcut(nn.Module):
    """Option A: subsample by the stride and zero-pad the new channels (no parameters)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.extra, self.stride = cout - cin, stride

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra)) if self.extra else x


def shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    return PadShortcut(cin, cout, stride) if stride != 1 or cin != cout else nn.Identity()


class BasicBlock(nn.Module):
    """conv-norm-ReLU-conv-norm, add the shortcut, ReLU (post-activation); under ``act_norm``
    conv-ReLU-norm-conv, add the shortcut, ReLU-norm."""

    def __init__(self, cin: int, cout: int, stride: int, norms: NormSites):
        super().__init__()
        self.act_first = norms.act_first
        self.conv1 = conv3x3(cin, cout, stride)
        self.norm1 = norms.inner(cout, self.conv1)
        self.act1 = activation_after(self.norm1)
        self.conv2 = conv3x3(cout, cout)
        self.norm2 = norms.inner(cout, self.conv2)
        # the ReLU after the addition stands for the second site's activation
        self.act2 = activation_after(self.norm2)
        self.shortcut = shortcut(cin, cout, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = site(self.conv1(x), self.norm1, self.act1, self.act_first)
        if self.act_first:
            return self.norm2(self.act2(self.conv2(out) + self.shortcut(x)))
        return self.act2(self.norm2(self.conv2(out)) + self.shortcut(x))


class PreActBlock(nn.Module):
    """norm-ReLU-conv-norm-ReLU-conv, add the shortcut (pre-activation); ReLU-norm-conv under ``act_norm``."""

    def __init__(self, cin: int, cout: int, stride: int, norms: NormSites, preceding: nn.Module):
        super().__init__()
        self.act_first = norms.act_first
        self.norm1 = norms.inner(cin, preceding)
        self.act1 = activation_after(self.norm1)
        self.conv1 = conv3x3(cin, cout, stride)
        self.norm2 = norms.inner(cout, self.conv1)
        self.act2 = activation_after(self.norm2)
        self.conv2 = conv3x3(cout, cout)
        self.shortcut = shortcut(cin, cout, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(site(x, self.norm1, self.act1, self.act_first))
        return self.conv2(site(out, self.norm2, self.act2, self.act_first)) + self.shortcut(x)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images; ``preact=True`` gives the pre-activation variant."""

    @staticmethod
    def depth_problem(depth: int) -> str | None:
        """Why ``depth`` is not a depth of this net, or None (the config's check and the constructor's)."""
        return cifar_resnet_depth_problem(depth)

    def __init__(self, depth: int, num_classes: int, in_channels: int, width: int, norms: NormSites,
                 preact: bool = False):
        super().__init__()
        problem = self.depth_problem(depth)
        if problem:
            raise ValueError(f"CIFAR ResNet {problem}")
        n = (depth - 2) // 6
        self.preact = preact
        self.act_first = norms.act_first
        self.stem = conv3x3(in_channels, width)
        if preact:
            self.stem_norm, self.stem_act = nn.Identity(), nn.Identity()
        else:
            self.stem_norm = norms.inner(width, self.stem)
            self.stem_act = activation_after(self.stem_norm)
        blocks: list[nn.Module] = []
        cin, last = width, self.stem
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                if preact:
                    block = PreActBlock(cin, cout, stride, norms, last)
                    last = block.conv2
                else:
                    block = BasicBlock(cin, cout, stride, norms)
                blocks.append(block)
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        last_conv = last if preact else blocks[-1].conv2
        self.final_norm = norms.final(cin, last_conv) if preact else norms.added_final(cin, last_conv)
        self.final_act = activation_after(self.final_norm) if preact else nn.Identity()
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = site(self.stem(x), self.stem_norm, self.stem_act, self.act_first)
        x = site(self.blocks(x), self.final_norm, self.final_act, self.act_first)
        return self.fc(x.mean(dim=(2, 3)))
