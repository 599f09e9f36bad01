"""Small but realistic architectures for the slot-finding and surgery tests.

Each builder returns ``(model, example_input)``. The models follow the way their families are
written in model zoos (torchvision's ResNet, ConvNeXt, a UNet, a pre-LN GPT block, torch's own
``nn.TransformerEncoder``), shrunk so that a forward pass takes milliseconds on a CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _input(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# -- ResNet ------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: two 3x3 convs with BN; a Conv2d+BN shortcut when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + identity)


class SmallResNet(nn.Module):
    """Stem conv+BN, two stages of BasicBlocks (the second downsamples), pooled linear head."""

    def __init__(self, width: int = 8, num_classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = nn.Sequential(BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, stride=2))
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(x.mean((2, 3)))


def resnet() -> tuple[nn.Module, torch.Tensor]:
    return SmallResNet(), _input(4, 3, 12, 12)


# -- ConvNeXt ----------------------------------------------------------------------------------


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over C of an ``(N, C, H, W)`` tensor, as timm and torchvision write it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7 conv, channels-last LayerNorm on the permuted tensor, inverted MLP."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dwconv(x).permute(0, 2, 3, 1)  # (N, H, W, C)
        out = self.pwconv2(F.gelu(self.pwconv1(self.norm(out))))
        return x + (self.gamma * out).permute(0, 3, 1, 2)


class SmallConvNeXt(nn.Module):
    """Patchify stem + LayerNorm2d, blocks, LayerNorm2d + 2x2 conv downsampling, head norm."""

    def __init__(self, dims: tuple[int, int] = (8, 16), num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 2, 2), LayerNorm2d(dims[0], eps=1e-6))
        self.stage1 = nn.Sequential(ConvNeXtBlock(dims[0]))
        self.downsample = nn.Sequential(
            LayerNorm2d(dims[0], eps=1e-6), nn.Conv2d(dims[0], dims[1], 2, 2)
        )
        self.stage2 = nn.Sequential(ConvNeXtBlock(dims[1]))
        self.head_norm = nn.LayerNorm(dims[1], eps=1e-6)
        self.head = nn.Linear(dims[1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.downsample(self.stage1(self.stem(x))))
        return self.head(self.head_norm(x.mean((2, 3))))


def convnext() -> tuple[nn.Module, torch.Tensor]:
    return SmallConvNeXt(), _input(2, 3, 20, 20)


# -- UNet --------------------------------------------------------------------------------------


class DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int, groups: int = 4) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1),
            nn.GroupNorm(groups, cout),
            nn.SiLU(),
            nn.Conv2d(cout, cout, 3, padding=1),
            nn.GroupNorm(groups, cout),
            nn.SiLU(),
        )


class SmallUNet(nn.Module):
    """Two-level UNet with GroupNorm: encoder, bottleneck, decoder with a skip connection."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.down1 = DoubleConv(1, width)
        self.down2 = DoubleConv(width, 2 * width)
        self.up = nn.ConvTranspose2d(2 * width, width, 2, 2)
        self.up1 = DoubleConv(2 * width, width)
        self.out = nn.Conv2d(width, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.down1(x)
        x = self.down2(F.max_pool2d(skip, 2))
        x = self.up1(torch.cat([skip, self.up(x)], 1))
        return self.out(x)


def unet() -> tuple[nn.Module, torch.Tensor]:
    return SmallUNet(), _input(2, 1, 8, 8)


# -- pre-LN transformer ------------------------------------------------------------------------


class PreLNBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class PreLNTransformer(nn.Module):
    """GPT-style: token + position embeddings, pre-LN blocks, final RMSNorm, LM head."""

    def __init__(
        self, vocab: int = 17, dim: int = 16, depth: int = 2, heads: int = 2, seq: int = 6
    ):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(1, seq, dim))
        self.blocks = nn.ModuleList(PreLNBlock(dim, heads) for _ in range(depth))
        self.ln_f = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos[:, : idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def pre_ln_transformer() -> tuple[nn.Module, torch.Tensor]:
    idx = torch.randint(0, 17, (3, 6), generator=torch.Generator().manual_seed(0))
    return PreLNTransformer(), idx


# -- torch's nn.TransformerEncoder -------------------------------------------------------------


class TorchEncoder(nn.Module):
    """``nn.TransformerEncoder`` (post-LN, batch_first, relu) with a final LayerNorm."""

    def __init__(self, dim: int = 16, heads: int = 2, depth: int = 3) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, norm=nn.LayerNorm(dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder(x, src_key_padding_mask=mask)


def torch_encoder() -> tuple[nn.Module, torch.Tensor]:
    return TorchEncoder(), _input(3, 5, 16)


# -- MLP and Conv1d ----------------------------------------------------------------------------


class MLP(nn.Module):
    """Tabular MLP: Linear -> BatchNorm1d on (N, C) -> ReLU, twice."""

    def __init__(self, cin: int = 10, hidden: int = 12) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(cin, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def mlp() -> tuple[nn.Module, torch.Tensor]:
    return MLP(), _input(6, 10)


class Conv1dNet(nn.Module):
    """1-D signal net: Conv1d -> BatchNorm1d on (N, C, L), twice, then pool and classify."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(2, width, 3, padding=1)
        self.bn1 = nn.BatchNorm1d(width)
        self.conv2 = nn.Conv1d(width, 2 * width, 3, padding=1)
        self.bn2 = nn.BatchNorm1d(2 * width)
        self.fc = nn.Linear(2 * width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(-1))


def conv1d_net() -> tuple[nn.Module, torch.Tensor]:
    return Conv1dNet(), _input(4, 2, 20)


# -- a norm module shared at two places ----------------------------------------------------------


class SharedNormNet(nn.Module):
    """One BatchNorm2d registered twice (``bn`` and ``branch.1``) and applied at both places."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.branch = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), self.bn)
        self.fc = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        x = F.relu(self.branch(x))
        return self.fc(x.mean((2, 3)))


def shared_norm_net() -> tuple[nn.Module, torch.Tensor]:
    return SharedNormNet(), _input(4, 3, 6, 6)


# -- fused norm subclasses -----------------------------------------------------------------------


class BatchNormAct2d(nn.BatchNorm2d):
    """timm-style fused layer: batch norm then an activation child module."""

    def __init__(self, num_features: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class DoubledBatchNorm2d(nn.BatchNorm2d):
    """Does something extra with no child module: cannot be reproduced by another norm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


class FusedNormNet(nn.Module):
    """A conv net whose norms are a BatchNormAct2d and a DoubledBatchNorm2d."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn_act = BatchNormAct2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.doubled = DoubledBatchNorm2d(width)
        self.fc = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn_act(self.conv1(x))
        x = self.doubled(self.conv2(x))
        return self.fc(x.mean((2, 3)))


def fused_norm_net() -> tuple[nn.Module, torch.Tensor]:
    return FusedNormNet(), _input(4, 3, 6, 6)


#: name -> builder, for tests parametrized over every architecture.
MODELS = {
    "resnet": resnet,
    "convnext": convnext,
    "unet": unet,
    "pre_ln_transformer": pre_ln_transformer,
    "torch_encoder": torch_encoder,
    "mlp": mlp,
    "conv1d": conv1d_net,
    "shared": shared_norm_net,
    "fused": fused_norm_net,
}


# -- what the slot and surgery tests share -----------------------------------------------------

CF, CL = "channels_first", "channels_last"

#: model -> [(slot name, kind, num_features, layout)], in named_modules() order.
EXPECTED_SLOTS = {
    "resnet": [
        ("bn1", "batchnorm", 8, CF),
        ("layer1.0.bn1", "batchnorm", 8, CF),
        ("layer1.0.bn2", "batchnorm", 8, CF),
        ("layer2.0.bn1", "batchnorm", 16, CF),
        ("layer2.0.bn2", "batchnorm", 16, CF),
        ("layer2.0.downsample.1", "batchnorm", 16, CF),
    ],
    "convnext": [
        ("stem.1", "layernorm", 8, CF),  # LayerNorm2d: permutes internally
        ("stage1.0.norm", "layernorm", 8, CL),  # nn.LayerNorm on (N, H, W, C)
        ("downsample.0", "layernorm", 8, CF),
        ("stage2.0.norm", "layernorm", 16, CL),
        ("head_norm", "layernorm", 16, CL),
    ],
    "unet": [
        ("down1.1", "groupnorm", 8, CF),
        ("down1.4", "groupnorm", 8, CF),
        ("down2.1", "groupnorm", 16, CF),
        ("down2.4", "groupnorm", 16, CF),
        ("up1.1", "groupnorm", 8, CF),
        ("up1.4", "groupnorm", 8, CF),
    ],
    "pre_ln_transformer": [
        ("blocks.0.ln_1", "layernorm", 16, CL),
        ("blocks.0.ln_2", "layernorm", 16, CL),
        ("blocks.1.ln_1", "layernorm", 16, CL),
        ("blocks.1.ln_2", "layernorm", 16, CL),
        ("ln_f", "rmsnorm", 16, CL),
    ],
    "torch_encoder": [
        *[(f"encoder.layers.{i}.norm{j}", "layernorm", 16, CL) for i in range(3) for j in (1, 2)],
        ("encoder.norm", "layernorm", 16, CL),
    ],
    "mlp": [("net.1", "batchnorm", 12, CF), ("net.4", "batchnorm", 12, CF)],
    "conv1d": [("bn1", "batchnorm", 8, CF), ("bn2", "batchnorm", 16, CF)],
    "shared": [("bn", "batchnorm", 8, CF)],
    "fused": [("bn_act", "batchnorm", 8, CF), ("doubled", "batchnorm", 8, CF)],
}


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    """``MODELS[name]()`` with torch's global seed at 0: the same weights every time."""
    torch.manual_seed(0)
    return MODELS[name]()


def randomize_norms(model: nn.Module) -> None:
    """Non-trivial affine weights and running statistics, so that carrying them over shows."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            for attr in ("weight", "bias", "running_mean"):
                tensor = getattr(module, attr, None)
                if isinstance(tensor, torch.Tensor) and tensor.dim() == 1:
                    tensor.copy_(torch.randn(tensor.shape, generator=g))
            if isinstance(getattr(module, "running_var", None), torch.Tensor):
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=g) + 0.5)


def call(model: nn.Module, x: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The model on its example input (a tensor, or a tuple of its positional arguments)."""
    return model(*x) if isinstance(x, tuple) else model(x)


def assert_trains(model: nn.Module, x: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """One training forward and backward: a finite output and a finite gradient for every
    trainable parameter. Returns the output."""
    model.train()
    out = call(model, x)
    out.float().square().mean().backward()
    assert torch.isfinite(out).all()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    return out
