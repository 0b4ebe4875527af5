"""Networks without shortcuts for depth studies: a plain deep CNN and an MLP.

The plain CNN is a stack of ``depth`` conv-norm-ReLU layers (3x3; conv-ReLU-norm under
``act_norm``), doubling the width and halving the resolution at one and two thirds of the depth,
then average pooling and a linear classifier: the "plain" baseline of He et al. 2016 at any
depth. The MLP is ``depth`` hidden linear-norm-ReLU layers of ``width`` units on the flattened
image; its norm layers see (N, C) input. Both exist to reproduce depth effects without
normalization (Bjorck et al. 2018).
"""

from __future__ import annotations

from torch import Tensor, nn

from trainer.model_rules import at_least_one_layer
from trainer.models.norms import NormSites, activation_after, init_weights


def _layer(weight: nn.Module, features: int, norms: NormSites) -> list[nn.Module]:
    """The weight layer with its norm and ReLU, in the placement's order."""
    norm = norms.inner(features, weight)
    act = activation_after(norm)
    return [weight, act, norm] if norms.act_first else [weight, norm, act]


class PlainCNN(nn.Module):
    depth_problem = staticmethod(at_least_one_layer)

    def __init__(self, depth: int, num_classes: int, in_channels: int, width: int, norms: NormSites):
        super().__init__()
        if self.depth_problem(depth):
            raise ValueError(f"plain CNN {self.depth_problem(depth)}")
        downsample_at = {depth // 3, 2 * depth // 3} - {0}
        layers: list[nn.Module] = []
        cin = in_channels
        cout = width
        conv = None
        for i in range(depth):
            stride = 1
            if i in downsample_at:
                stride, cout = 2, cout * 2
            conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
            layers += _layer(conv, cout, norms)
            cin = cout
        self.features = nn.Sequential(*layers)
        self.final_norm = norms.added_final(cin, conv)
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.final_norm(self.features(x)).mean(dim=(2, 3)))


class MLP(nn.Module):
    depth_problem = staticmethod(at_least_one_layer)

    def __init__(self, depth: int, num_classes: int, in_features: int, width: int, norms: NormSites):
        super().__init__()
        if self.depth_problem(depth):
            raise ValueError(f"MLP {self.depth_problem(depth)}")
        layers: list[nn.Module] = [nn.Flatten()]
        cin = in_features
        linear = None
        for _ in range(depth):
            linear = nn.Linear(cin, width, bias=False)
            layers += _layer(linear, width, norms)
            cin = width
        self.features = nn.Sequential(*layers)
        self.final_norm = norms.added_final(cin, linear)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.final_norm(self.features(x)))
