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
ResBlock adds a (SiLU, Linear) projection of it to its hidden state (no scale-shift norm). With
``num_labels`` a class-label embedding is added to the time embedding (improved-diffusion's
class-conditional U-Net), its row ``num_labels`` meaning "no condition".
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
    ImageInputFeatures,
    LabelEmbedding,
    SpatialSelfAttention,
    check_divides,
    check_dropout,
    check_int,
    check_int_tuple,
    check_unconditional,
    cos_sin_embedding,
    linear_on_concat,
    per_sample_time,
    zero_init_,
)

TIME_SCALE = 4000.0  # the reference feeds t * 4000 to the sinusoidal embedding


class ResBlock(nn.Module):
    """GN-SiLU-conv, + time projection, GN-SiLU-dropout-zero conv, plus a (1x1 conv) skip.

    ``scale_shift=True`` (improved-diffusion's use_scale_shift_norm): the time projection gives a
    scale and a shift applied after the second GroupNorm, GN(h) * (1 + scale) + shift, instead of
    being added before it.
    """

    def __init__(
        self,
        ch_in: int,
        ch_out: int,
        emb_dim: int,
        dropout: float,
        groups: int,
        scale_shift: bool = False,
    ):
        super().__init__()
        self.scale_shift = scale_shift
        self.in_layers = nn.Sequential(GroupNorm32(groups, ch_in), nn.SiLU(), nn.Conv2d(ch_in, ch_out, 3, padding=1))
        self.emb_proj = nn.Linear(emb_dim, 2 * ch_out if scale_shift else ch_out)
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
        if self.scale_shift:
            scale, shift = self.emb_proj(act_emb)[:, :, None, None].to(h.dtype).chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            return self.out_layers[1:](h).add_(self.skip(x))
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
        num_heads_upsample: attention heads on the way up (None: num_heads).
        norm_groups: GroupNorm groups (must divide model_channels).
        skip: concatenate the projected input with the final features before the output Linear.
        channels_last: keep activations NHWC in memory (channels_last), which makes the CPU
            convolutions faster; False keeps them NCHW-contiguous.
        input_features: keyword arguments of ``ImageInputFeatures`` (per-pixel features of the
            input); None = the values and 2t - 1.
        project_input: pass the input features through a per-pixel Linear to model_channels
            before the first conv (the skip then carries the projection); False feeds the
            features to the first conv and the skip directly.
        scale_shift_norm: ResBlocks apply the time embedding as a scale and shift after their
            second GroupNorm (improved-diffusion's use_scale_shift_norm).
        num_labels: class-conditional network: an embedding of ``num_labels`` + 1 rows (the
            last: no condition) added to the time embedding; None (default) builds the
            unconditional network, parameter for parameter and draw for draw.
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
        input_features: dict | None = None,
        project_input: bool = True,
        scale_shift_norm: bool = False,
        num_heads_upsample: int | None = None,
        num_labels: int | None = None,
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
        attention_resolutions = check_int_tuple("attention_resolutions", attention_resolutions, allow_empty=True)
        dropout = check_dropout("dropout", dropout)
        check_int("num_heads", num_heads)
        num_heads_upsample = num_heads if num_heads_upsample is None else num_heads_upsample
        check_int("num_heads_upsample", num_heads_upsample)
        check_int("norm_groups", norm_groups)
        check_divides("norm_groups", norm_groups, "model_channels", model_channels)
        if image_size % 2 ** (len(channel_mult) - 1):
            raise ValueError(
                f"image_size={image_size} must be divisible by 2^(len(channel_mult)-1) = {2 ** (len(channel_mult) - 1)}"
            )
        widths = [model_channels * mult for mult in channel_mult]
        attention_levels = [w for i, w in enumerate(widths) if 2**i in attention_resolutions]
        for width in [widths[-1], *attention_levels]:  # where attention is
            check_divides("num_heads", num_heads, "model_channels*channel_mult", width)
        for width in attention_levels:
            check_divides("num_heads_upsample", num_heads_upsample, "model_channels*channel_mult", width)
        self.skip = bool(skip)
        self.channels_last = bool(channels_last)
        self.project_input = bool(project_input)

        emb_dim = 4 * model_channels
        blocks = dict(emb_dim=emb_dim, dropout=dropout, groups=norm_groups, scale_shift=bool(scale_shift_norm))
        attn = dict(num_heads=num_heads, norm_groups=norm_groups, qkv_layout="head_qkv")
        attn_up = dict(attn, num_heads=num_heads_upsample)

        self.input_features = ImageInputFeatures(in_channels, (image_size, image_size), **(input_features or {}))
        num_features = self.input_features.num_features
        self.input_proj = nn.Linear(num_features, model_channels) if self.project_input else None
        input_width = model_channels if self.project_input else num_features
        self.time_mlp = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        # Down path: every stage's output is kept for a skip connection.
        self.down = nn.ModuleList([Stage(nn.Conv2d(input_width, model_channels, 3, padding=1))])
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

        self.middle = Stage(ResBlock(ch, ch, **blocks), SpatialSelfAttention(ch, **attn), ResBlock(ch, ch, **blocks))

        # Up path: each stage consumes one skip connection (concatenated on channels).
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skip_widths.pop(), model_channels * mult, **blocks)]
                ch = model_channels * mult
                if factor in attention_resolutions:
                    layers.append(SpatialSelfAttention(ch, **attn_up))
                if level > 0 and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    factor //= 2
                self.up.append(Stage(*layers))

        self.out = nn.Sequential(
            GroupNorm32(norm_groups, ch),
            nn.SiLU(),
            zero_init_(nn.Conv2d(ch, out_channels, 3, padding=1)),
        )
        head_in = out_channels + (input_width if self.skip else 0)
        self.head = nn.Linear(head_in, in_channels * out_height)
        # built last, so the other parameters draw what the unconditional network draws
        self.num_labels = None if num_labels is None else check_int("num_labels", num_labels)
        self.label_embedding = None if num_labels is None else LabelEmbedding(num_labels, emb_dim)

    def forward(self, x: Tensor, t: Tensor, label: Tensor | None = None) -> Tensor:
        """x: (B, H, W, C) float; t: (B,) in [0, 1]; label: (B,) long or None (no condition)
        -> (B, H, W, C, out_height)."""
        b, height, width, c = self._check_input(x)
        t = per_sample_time(t, b).float()  # float32: t * 4000 needs the precision

        # Per-pixel features ([x, 2t-1] by default) and their projection, channel-last:
        # (B, H, W, mc), or the features themselves without project_input.
        x_proj = self.input_features(x, t)
        if self.input_proj is not None:
            x_proj = self.input_proj(x_proj)

        emb = self.time_mlp(cos_sin_embedding(t * TIME_SCALE, self.model_channels))
        if self.label_embedding is None:
            check_unconditional(label)
        else:
            emb = emb + self.label_embedding(label, b, x.device).to(emb.dtype)  # (B, emb_dim)
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
