"""DINO/iBOT projection head.

The backbone's CLS (DINO) or patch (iBOT) token is mapped to scores over a large set of
learned prototypes. The bottleneck is L2-normalised and the prototype vectors are unit-norm,
so every logit is a cosine similarity in [-1, 1]: the temperature alone sets the sharpness,
which keeps the teacher's softmax well behaved whatever the feature scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DINOHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> unit-norm prototype layer.

    The prototype weight rows are normalised in ``forward`` (the effect of DINO's
    ``weight_norm`` with a frozen gain of 1) instead of using the deprecated
    ``torch.nn.utils.weight_norm``: the raw weights stay a plain ``nn.Linear``
    parameter, so optimisers, FSDP and checkpoints see one ordinary tensor.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        self.in_dim, self.out_dim = in_dim, out_dim
        self.norm_eps = norm_eps
        if nlayers == 1:
            layers: list[nn.Module] = [nn.Linear(in_dim, bottleneck_dim)]
        else:
            layers = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Truncated-normal (std 0.02) MLP weights, zero biases, as in DINO/iBOT."""
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.last_layer.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) features -> (..., out_dim) prototype logits (cosine similarities)."""
        z = F.normalize(self.mlp(x), dim=-1, eps=self.norm_eps)
        prototypes = F.normalize(self.last_layer.weight, dim=-1, eps=self.norm_eps)
        return F.linear(z, prototypes)
