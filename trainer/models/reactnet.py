"""ReActNet-18: a ResNet-18 with binary 3x3 convolutions, with or without normalization.

Liu et al., "ReActNet: Towards Precise Binary Neural Networks with Generalized Activation
Functions", ECCV 2020, on the Bi-Real Net-18 layout (Liu et al. 2018): a real-valued stem, four
stages of four blocks (64, 128, 256, 512 base filters; stride 2 at the first block of stages 2-4),
each block one 3x3 convolution with its own shortcut,

    out = RPReLU(norm(conv3x3(RSign(x))) + shortcut(x))

where a shape-changing shortcut is 2x2 average pooling, a real 1x1 conv and a norm; global average
pooling and a real linear classifier. The stem is a 3x3 stride-1 conv (the CIFAR form, no max
pooling: it also serves 8x8 digits). ``binary``: ``none`` (real-valued, no sign), ``activations``
(RSign before each 3x3 conv) or ``weights_and_activations`` (also binary weights, ``BinaryConv2d``).

The BN-free form of Chen et al., "BNN - BN = ?", CVPRW 2021 (NF-ResNet signal propagation, Brock,
De & Smith 2021) is ``norm=none`` with ``weight_std=scaled_ws``: with scaled weight standardisation
each block scales its input by beta = 1/sqrt(Var) (the expected variance of the block's input)
and its branch by alpha = 0.2,

    out = RPReLU(alpha * conv3x3(RSign(beta * x)) + shortcut)

where shortcut is x itself or, at a transition, the shortcut path applied to beta * x. The expected
variance starts at 1, grows by alpha^2 per block and is reset to 1 + alpha^2 after a transition.
The convolutions see signs or unit-variance inputs, so the scaled WS gain gamma is 1.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from normlayers import BinaryConv2d, RPReLU, RSign
from trainer.model_rules import BINARY_MODES, any_depth
from trainer.models.norms import NormSites

STAGE_BLOCKS = (4, 4, 4, 4)
NF_ALPHA = 0.2


class Shortcut(nn.Module):
    """The transition shortcut: 2x2 average pooling (at stride 2), a real 1x1 conv and a norm."""

    def __init__(self, cin: int, cout: int, stride: int, norms: NormSites):
        super().__init__()
        self.pool = nn.AvgPool2d(2, stride=2, ceil_mode=True) if stride > 1 else nn.Identity()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.norm = norms.inner(cout, self.conv)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(self.pool(x)))


class ReActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norms: NormSites, binary: str, alpha: float = 1.0,
                 beta: float = 1.0):
        super().__init__()
        self.alpha, self.beta = alpha, beta
        self.sign = RSign(cin) if binary != "none" else nn.Identity()
        conv = BinaryConv2d if binary == "weights_and_activations" else nn.Conv2d
        self.conv = conv(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm = norms.inner(cout, self.conv)
        self.transition = stride != 1 or cin != cout
        self.shortcut = Shortcut(cin, cout, stride, norms) if self.transition else nn.Identity()
        self.act = RPReLU(cout)

    def forward(self, x: Tensor) -> Tensor:
        x_in = x * self.beta if self.beta != 1.0 else x
        out = self.norm(self.conv(self.sign(x_in)))
        if self.alpha != 1.0:
            out = out * self.alpha
        return self.act(out + (self.shortcut(x_in) if self.transition else x))

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta:.4f}" if self.alpha != 1.0 else ""


class ReActNet(nn.Module):
    weight_std_gamma = 1.0  # every conv sees signs, images or unit-variance (beta-scaled) input

    @staticmethod
    def depth_problem(depth: int) -> str | None:
        return any_depth(depth)

    def __init__(self, num_classes: int, in_channels: int, width: int, norms: NormSites, binary: str = "none",
                 normalizer_free: bool = False):
        super().__init__()
        if binary not in BINARY_MODES:
            raise ValueError(f"model.binary must be one of {', '.join(BINARY_MODES)}, got {binary!r}")
        if norms.act_first:
            raise ValueError("reactnet puts each norm right after its conv; use model.norm_order=norm_act or auto")
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.stem_norm = norms.inner(width, self.stem)
        alpha = NF_ALPHA if normalizer_free else 1.0
        expected_var = 1.0
        blocks: list[ReActBlock] = []
        cin = width
        for stage, count in enumerate(STAGE_BLOCKS):
            cout = width * 2**stage
            for i in range(count):
                beta = 1.0 / math.sqrt(expected_var) if normalizer_free else 1.0
                block = ReActBlock(cin, cout, 2 if stage > 0 and i == 0 else 1, norms, binary, alpha, beta)
                blocks.append(block)
                expected_var = 1.0 + alpha**2 if block.transition else expected_var + alpha**2
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.final_norm = norms.added_final(cin, blocks[-1].conv)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.stem_norm(self.stem(x)))
        return self.fc(self.final_norm(x).mean(dim=(2, 3)))
