"""``syncbatchnorm``: batch normalization with the statistics of every process of the run.

torch's ``nn.SyncBatchNorm`` syncs on GPU only (on CPU under ``torch.distributed`` it raises, and
``DistributedDataParallel`` refuses a CPU model that holds one) and takes ``(N, C, *)`` inputs
only. :class:`SyncBatchNorm` is a batch norm that runs ``nn.SyncBatchNorm``'s forward (torch's
kernels) on CUDA/XPU; on any other device (CPU with the gloo backend) it all-reduces the
per-channel sums itself, with gradients flowing through the reduction; without an initialized
process group, or with one process, it is plain batch normalization. It is no subclass of
``nn.SyncBatchNorm``, so that DDP trains it on CPU too. It also takes tokens (``channels_last``:
statistics over every position of every process).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from autonorm.norms._layers import CHANNELS_FIRST, CHANNELS_LAST, _check_features, check_layout

#: Devices on which ``nn.SyncBatchNorm`` syncs with its own kernels.
_NATIVE_SYNC_DEVICES = ("cuda", "hpu", "xpu")


class _AllReduceSum(torch.autograd.Function):
    """Sum over the processes of a group; the backward sums the gradients too (every rank's
    loss depends on the global sum, as in ``nn.SyncBatchNorm``)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sum(tensor: torch.Tensor, group: Any | None = None) -> torch.Tensor:
    """``tensor`` summed over the processes of ``group`` (None: every process), differentiably:
    the gradient is summed over the processes too. Used by SyncBatchNorm and SwitchableNorm."""
    out: torch.Tensor = _AllReduceSum.apply(tensor, group)
    return out


def _distributed_world() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def global_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the processes of the run (itself on one process)."""
    return all_reduce_sum(tensor) if _distributed_world() > 1 else tensor


def global_count(count: int, device: torch.device) -> int:
    """``count`` summed over the processes of the run (the global batch, or token count)."""
    if _distributed_world() <= 1:
        return count
    total = torch.tensor([float(count)], device=device)
    dist.all_reduce(total)
    return int(total.item())


class SyncBatchNorm(_BatchNorm):
    """``nn.SyncBatchNorm`` on any device, for ``(N, C, *)`` or ``(..., C)`` inputs.

    In training under ``torch.distributed`` with more than one process in ``process_group``,
    the mean and (biased) variance of each channel are those of the batch of all processes
    together; running statistics take the unbiased variance, as in ``nn.BatchNorm``. In eval,
    or on one process, it is ``nn.BatchNorm{1,2,3}d``. ``state_dict`` keys are batch norm's.

    Args:
        num_features: number of channels C.
        eps, momentum, affine, track_running_stats, process_group: as ``nn.SyncBatchNorm``.
        layout: ``"channels_first"`` (``(N, C, *)``) or ``"channels_last"`` (``(..., C)``).

    Example::

        >>> layer = SyncBatchNorm(8)  # no process group: plain batch norm
        >>> layer(torch.randn(4, 8, 3, 3)).shape
        torch.Size([4, 8, 3, 3])
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any | None = None,
        *,
        layout: str = CHANNELS_FIRST,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            num_features,
            eps=eps,
            momentum=momentum,
            affine=affine,
            track_running_stats=track_running_stats,
            device=device,
            dtype=dtype,
        )
        self.process_group = process_group
        self.layout = check_layout(layout)

    # what nn.SyncBatchNorm's forward (run on CUDA/XPU) calls on its layer
    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _check_non_zero_input_channels(self, input: torch.Tensor) -> None:
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text if self.layout == CHANNELS_FIRST else f"{text}, layout={self.layout!r}"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.layout == CHANNELS_LAST:
            if input.dim() < 2:
                raise ValueError(f"expected an input of shape (..., C), got {tuple(input.shape)}")
            _check_features(self, input, -1)
            flat = input.reshape(-1, input.shape[-1])
            return self._forward_channels_first(flat).reshape(input.shape)
        if input.dim() >= 2:
            _check_features(self, input, 1)
        return self._forward_channels_first(input)

    def _group(self) -> tuple[Any, int]:
        """The process group to sync over and its size (1: no sync)."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None, 1
        group = self.process_group or dist.group.WORLD
        return group, dist.get_world_size(group)

    def _forward_channels_first(self, x: torch.Tensor) -> torch.Tensor:
        group, world = self._group()
        native = x.device.type in (*_NATIVE_SYNC_DEVICES, torch._C._get_privateuse1_backend_name())
        if world <= 1:
            return super().forward(x)
        if native:
            return nn.SyncBatchNorm.forward(self, x)  # type: ignore[arg-type]
        self._check_input_dim(x)
        self._check_non_zero_input_channels(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked.item())
        n, c = x.shape[:2]
        x3 = x.reshape(n, c, -1)
        compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        xc = x3.to(compute)
        local = torch.cat([xc.sum((0, 2)), xc.new_tensor([float(n * x3.shape[-1])])])
        sums = all_reduce_sum(local, group)
        count = float(sums[-1].item())
        if count <= 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got input of shape "
                f"{tuple(x.shape)} on each of {world} processes"
            )
        mean = sums[:-1] / count
        centered = xc - mean[None, :, None]
        var = all_reduce_sum(centered.square().sum((0, 2)), group) / count
        out = centered * torch.rsqrt(var + self.eps)[None, :, None]
        if self.weight is not None:
            out = out * self.weight.to(compute)[None, :, None]
        if self.bias is not None:
            out = out + self.bias.to(compute)[None, :, None]
        if self.track_running_stats and self.running_mean is not None:
            assert self.running_var is not None
            with torch.no_grad():
                unbiased = var.detach() * (count / (count - 1))
                dtype = self.running_mean.dtype
                self.running_mean.mul_(1 - factor).add_(mean.detach().to(dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.to(dtype), alpha=factor)
        return out.to(x.dtype).reshape(x.shape)
