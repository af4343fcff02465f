"""The improved-diffusion U-Net (Nichol & Dhariwal 2021) as the BFN reference uses it for MNIST.

Data flow (paper config, binarized MNIST, B images of 28x28x1)::

    x (B,28,28,1), t (B,)
      -> per-pixel features [x, 2t-1]                      (B,28,28,2)
      -> input projection Linear(2 -> 128)                 (B,28,28,128)  = x_proj
      -> conv 3x3, ResBlocks / conv down-sampling          28 -> 14 -> 7
      -> middle: ResBlock, 4-head self-attention, ResBlock (7x7)
      -> ResBlocks on [h, skip] / nearest-x2 + conv up     7 -> 14 -> 28
      -> GroupNorm, SiLU, zero-initialised conv 3x3        (B,128,28,28)
      -> concat with x_proj (skip=True)                    (B,28,28,256)
      -> per-pixel Linear(256 -> C*out_height)             (B,28,28,1,1)

The time t enters through a sinusoidal embedding of t*4000 followed by Linear-SiLU-Linear; every
ResBlock adds a (SiLU, Linear) projection of it to its hidden state (no scale-shift norm).
GroupNorm is computed in float32. Attention only sits in the middle block unless
``attention_resolutions`` names a down-sampling factor (the paper config names none that occur).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import (
    Dropout,
    GroupNorm32,
    SpatialSelfAttention,
    check_divides,
    check_dropout,
    check_int,
    check_int_tuple,
    cos_sin_embedding,
    linear_on_concat,
    per_sample_time,
    zero_init_,
)

TIME_SCALE = 4000.0  # the reference feeds t * 4000 to the sinusoidal embedding


class ResBlock(nn.Module):
    """GN-SiLU-conv, + time projection, GN-SiLU-dropout-zero conv, plus a (1x1 conv) skip."""

    def __init__(self, ch_in: int, ch_out: int, emb_dim: int, dropout: float, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm32(groups, ch_in), nn.SiLU(), nn.Conv2d(ch_in, ch_out, 3, padding=1)
        )
        self.emb_proj = nn.Linear(emb_dim, ch_out)
        self.out_layers = nn.Sequential(
            GroupNorm32(groups, ch_out),
            nn.SiLU(),
            Dropout(dropout),
            zero_init_(nn.Conv2d(ch_out, ch_out, 3, padding=1)),
        )
        self.skip = nn.Identity() if ch_in == ch_out else nn.Conv2d(ch_in, ch_out, 1)

    def forward(self, x: Tensor, act_emb: Tensor) -> Tensor:
        """x: (B, ch_in, H, W); act_emb: SiLU(time embedding), (B, emb_dim)."""
        h = self.in_layers(x)  # a fresh conv output, so the in-place adds are safe
        h += self.emb_proj(act_emb)[:, :, None, None].to(h.dtype)
        return self.out_layers(h).add_(self.skip(x))


class Downsample(nn.Module):
    """Strided 3x3 convolution halving H and W."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 up-sampling followed by a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Stage(nn.Sequential):
    """A sequence of layers; ResBlocks also receive the activated time embedding."""

    def forward(self, x: Tensor, act_emb: Tensor) -> Tensor:
        for layer in self:
            x = layer(x, act_emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class UNet(nn.Module):
    """improved-diffusion U-Net; ``net(x, t)`` maps (B,H,W,C), (B,) -> (B,H,W,C,out_height).

    Args (defaults = the paper's MNIST config, 24.81M parameters):
        in_channels: data channels C (1 for MNIST). The net adds the 2t-1 feature itself.
        out_height: outputs per data channel (1 = Bernoulli logit).
        image_size: H = W of the inputs; must be divisible by 2^(len(channel_mult)-1).
        model_channels: base width (also the width of the input projection).
        out_channels: width of the final conv (the reference sets it equal to model_channels).
        channel_mult: width multiplier per resolution level.
        num_res_blocks: ResBlocks per level on the way down (one more on the way up).
        attention_resolutions: down-sampling factors (1, 2, 4, ...) that get attention blocks.
        dropout: dropout inside every ResBlock.
        num_heads: attention heads (must divide the width where attention is used).
        norm_groups: GroupNorm groups (must divide model_channels).
        skip: concatenate the projected input with the final features before the output Linear.
        channels_last: keep activations NHWC in memory (channels_last), which makes the CPU
            convolutions faster; False keeps them NCHW-contiguous.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        out_height: int = 1,
        image_size: int = 28,
        model_channels: int = 128,
        out_channels: int | None = None,
        channel_mult: tuple[int, ...] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: tuple[int, ...] = (),
        dropout: float = 0.5,
        num_heads: int = 4,
        norm_groups: int = 32,
        skip: bool = True,
        channels_last: bool = True,
    ):
        super().__init__()
        self.in_channels = check_int("in_channels", in_channels)
        self.out_height = check_int("out_height", out_height)
        self.image_size = check_int("image_size", image_size)
        self.model_channels = check_int("model_channels", model_channels)
        out_channels = model_channels if out_channels is None else out_channels
        check_int("out_channels", out_channels)
        channel_mult = check_int_tuple("channel_mult", channel_mult)
        check_int("num_res_blocks", num_res_blocks)
        attention_resolutions = check_int_tuple(
            "attention_resolutions", attention_resolutions, allow_empty=True
        )
        dropout = check_dropout("dropout", dropout)
        check_int("num_heads", num_heads)
        check_int("norm_groups", norm_groups)
        check_divides("norm_groups", norm_groups, "model_channels", model_channels)
        if image_size % 2 ** (len(channel_mult) - 1):
            raise ValueError(
                f"image_size={image_size} must be divisible by 2^(len(channel_mult)-1)"
                f" = {2 ** (len(channel_mult) - 1)}"
            )
        for width in (model_channels * mult for mult in channel_mult):  # where attention may be
            check_divides("num_heads", num_heads, "model_channels*channel_mult", width)
        self.skip = bool(skip)
        self.channels_last = bool(channels_last)

        emb_dim = 4 * model_channels
        blocks = dict(emb_dim=emb_dim, dropout=dropout, groups=norm_groups)
        attn = dict(num_heads=num_heads, norm_groups=norm_groups, qkv_layout="head_qkv")

        self.input_proj = nn.Linear(in_channels + 1, model_channels)
        self.time_mlp = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )

        # Down path: every stage's output is kept for a skip connection.
        self.down = nn.ModuleList([Stage(nn.Conv2d(model_channels, model_channels, 3, padding=1))])
        skip_widths, ch, factor = [model_channels], model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, model_channels * mult, **blocks)]
                ch = model_channels * mult
                if factor in attention_resolutions:
                    layers.append(SpatialSelfAttention(ch, **attn))
                self.down.append(Stage(*layers))
                skip_widths.append(ch)
            if level != len(channel_mult) - 1:
                self.down.append(Stage(Downsample(ch)))
                skip_widths.append(ch)
                factor *= 2

        self.middle = Stage(
            ResBlock(ch, ch, **blocks), SpatialSelfAttention(ch, **attn), ResBlock(ch, ch, **blocks)
        )

        # Up path: each stage consumes one skip connection (concatenated on channels).
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skip_widths.pop(), model_channels * mult, **blocks)]
                ch = model_channels * mult
                if factor in attention_resolutions:
                    layers.append(SpatialSelfAttention(ch, **attn))
                if level > 0 and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    factor //= 2
                self.up.append(Stage(*layers))

        self.out = nn.Sequential(
            GroupNorm32(norm_groups, ch),
            nn.SiLU(),
            zero_init_(nn.Conv2d(ch, out_channels, 3, padding=1)),
        )
        head_in = out_channels + (model_channels if self.skip else 0)
        self.head = nn.Linear(head_in, in_channels * out_height)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """x: (B, H, W, C) float; t: (B,) in [0, 1] -> (B, H, W, C, out_height)."""
        b, height, width, c = self._check_input(x)
        t = per_sample_time(t, b).float()  # float32: t * 4000 needs the precision

        # Per-pixel features [x, 2t-1] and their projection, channel-last: (B, H, W, mc).
        t_feat = (2 * t - 1).to(x.dtype).view(b, 1, 1, 1).expand(b, height, width, 1)
        x_proj = self.input_proj(torch.cat([x, t_feat], dim=-1))

        emb = self.time_mlp(cos_sin_embedding(t * TIME_SCALE, self.model_channels))
        act_emb = F.silu(emb)  # every ResBlock starts its time projection with SiLU

        h = x_proj.permute(0, 3, 1, 2)  # (B, mc, H, W); NHWC memory, so no copy
        if not self.channels_last:
            h = h.contiguous()
        skips = []
        for stage in self.down:
            h = stage(h, act_emb)
            skips.append(h)
        h = self.middle(h, act_emb)
        for stage in self.up:
            h = stage(torch.cat([h, skips.pop()], dim=1), act_emb)

        out = self.out(h).permute(0, 2, 3, 1)  # (B, H, W, out_channels)
        # head([x_proj, out]) with skip=True: (B, H, W, mc + out_channels) -> (B, H, W, C*h)
        out = linear_on_concat(self.head, [x_proj, out] if self.skip else [out])
        return out.reshape(b, height, width, c, self.out_height)

    def _check_input(self, x: Tensor) -> tuple[int, int, int, int]:
        expected = (self.image_size, self.image_size, self.in_channels)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"net_inputs must have shape (B, {expected}), got {tuple(x.shape)}")
        return tuple(x.shape)
