"""The VDM U-Net (Kingma et al. 2021; A. Dittadi's port) used by the BFN reference for CIFAR-10.

It never changes resolution. Data flow (paper config, B images of 32x32x3)::

    mu (B,32,32,3), t (B,)
      -> [mu, sin/cos(2*pi*2^n*mu) for n in 5,6]           (B,15,32,32)
      -> conv_in 3x3                                       (B,128,32,32)
      -> 32 ResnetBlocks (each output kept for a skip)
      -> middle: ResnetBlock, single-head attention, ResnetBlock
      -> 33 ResnetBlocks on [h, skip]                      (256 -> 128 channels)
      -> GroupNorm, SiLU, zero-initialised conv 3x3        (B,128,32,32)
      -> concat with mu                                    (B,32,32,131)
      -> per-pixel Linear(131 -> 3*out_height)             (B,32,32,3,out_height)

Time: sinusoidal embedding ([sin, cos], 128 dims) of (t + 0.001) * 1000, then
Linear-SiLU-Linear-SiLU to 512 dims; each ResnetBlock adds a zero-initialised, bias-free
projection of it. With ``num_labels`` a class-label embedding (512 dims) is added to it, its row
``num_labels`` meaning "no condition".
"""

from __future__ import annotations

import math

import torch
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
    check_unconditional,
    linear_on_concat,
    per_sample_time,
    sin_cos_embedding,
    zero_init_,
)


class FourierFeatures(nn.Module):
    """Per-pixel Fourier features of the input: (B, C, H, W) -> (B, 2*F*C, H, W).

    Channel order: all sines, then all cosines; within each, frequency-major (index f*C + c),
    with frequencies 2*pi*2^n for n in ``exponents``.
    """

    def __init__(self, exponents: tuple[float, ...] = (5.0, 6.0)):
        super().__init__()
        self.freqs = tuple(2.0 * math.pi * 2.0**n for n in exponents)

    @property
    def num_features(self) -> int:
        return 2 * len(self.freqs)

    def forward(self, x: Tensor) -> Tensor:
        args = torch.cat([f * x for f in self.freqs], dim=1)  # (B, F*C, H, W)
        return torch.cat([args.sin(), args.cos()], dim=1)


class ResnetBlock(nn.Module):
    """GN-SiLU-conv, + zero-init time projection, GN-SiLU-dropout-zero conv, plus a skip."""

    def __init__(self, ch_in: int, ch_out: int, cond_dim: int, dropout: float, groups: int):
        super().__init__()
        self.net1 = nn.Sequential(GroupNorm32(groups, ch_in), nn.SiLU(), nn.Conv2d(ch_in, ch_out, 3, padding=1))
        self.cond_proj = zero_init_(nn.Linear(cond_dim, ch_out, bias=False))
        self.net2 = nn.Sequential(
            GroupNorm32(groups, ch_out),
            nn.SiLU(),
            Dropout(dropout),
            zero_init_(nn.Conv2d(ch_out, ch_out, 3, padding=1)),
        )
        self.skip = nn.Identity() if ch_in == ch_out else nn.Conv2d(ch_in, ch_out, 1)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        """x: (B, ch_in, H, W); cond: (B, cond_dim)."""
        h = self.net1(x)  # a fresh conv output, so the in-place adds are safe
        h += self.cond_proj(cond)[:, :, None, None].to(h.dtype)
        return self.net2(h).add_(self.skip(x))


class UNetVDM(nn.Module):
    """VDM U-Net; ``net(mu, t)`` maps (B,H,W,C), (B,) -> (B,H,W,C,out_height).

    Args (defaults = the paper's CIFAR-10 config, 30.72M parameters):
        in_channels: data channels C (3 for CIFAR-10).
        out_height: outputs per channel: 2 (eps_hat, log sigma_eps) for discretised data,
            1 (eps_hat) for continuous data.
        image_size: H = W of the inputs (any size works; it is only checked).
        embedding_dim: width of every block; the time MLP is 4x as wide.
        n_blocks: ResnetBlocks on the way down (n_blocks + 1 on the way up).
        n_attention_heads: heads of the middle attention block.
        attention_everywhere: also put an attention block after every down/up ResnetBlock.
        dropout: dropout inside every ResnetBlock.
        norm_groups: GroupNorm groups (must divide embedding_dim).
        fourier_exponents: n of the 2*pi*2^n Fourier features of the input; () disables them.
        channels_last: keep activations NHWC in memory (channels_last), which makes the CPU
            convolutions faster; False keeps them NCHW-contiguous.
        input_features: keyword arguments of ``ImageInputFeatures``: per-pixel features built
            from the input (e.g. 2t - 1, position codes) that replace it everywhere (Fourier
            features, conv_in, the skip into the head). None (default): the input alone.
        time_frequencies: how the time embedding's frequencies are computed: "exp"
            (exp(-ln(1e4) i / (half - 1))) or "logspace" (torch.logspace, as the reference
            does; the two differ by a few float32 ulps).
        num_labels: class-conditional network: an embedding of ``num_labels`` + 1 rows (the
            last: no condition) added to the time embedding; None (default) builds the
            unconditional network, parameter for parameter and draw for draw.
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        out_height: int = 2,
        image_size: int = 32,
        embedding_dim: int = 128,
        n_blocks: int = 32,
        n_attention_heads: int = 1,
        attention_everywhere: bool = False,
        dropout: float = 0.1,
        norm_groups: int = 32,
        fourier_exponents: tuple[float, ...] = (5.0, 6.0),
        channels_last: bool = True,
        input_features: dict | None = None,
        time_frequencies: str = "exp",
        num_labels: int | None = None,
    ):
        super().__init__()
        self.in_channels = check_int("in_channels", in_channels)
        self.out_height = check_int("out_height", out_height)
        self.image_size = check_int("image_size", image_size)
        self.embedding_dim = check_int("embedding_dim", embedding_dim)
        check_int("n_blocks", n_blocks, minimum=0)
        check_int("n_attention_heads", n_attention_heads)
        check_divides("n_attention_heads", n_attention_heads, "embedding_dim", embedding_dim)
        dropout = check_dropout("dropout", dropout)
        check_int("norm_groups", norm_groups)
        check_divides("norm_groups", norm_groups, "embedding_dim", embedding_dim)
        if embedding_dim % 2:
            raise ValueError(f"embedding_dim must be even, got {embedding_dim}")
        self.channels_last = bool(channels_last)
        if time_frequencies not in ("exp", "logspace"):
            raise ValueError(f"time_frequencies must be 'exp' or 'logspace', got {time_frequencies!r}")
        self.time_frequencies = time_frequencies
        self.input_features = None
        num_features = in_channels
        if input_features is not None:
            self.input_features = ImageInputFeatures(in_channels, (image_size, image_size), **input_features)
            num_features = self.input_features.num_features

        cond_dim = 4 * embedding_dim
        block = dict(cond_dim=cond_dim, dropout=dropout, groups=norm_groups)
        attn = dict(num_heads=n_attention_heads, norm_groups=norm_groups, qkv_layout="qkv_head")

        self.fourier = FourierFeatures(tuple(float(n) for n in fourier_exponents))
        conv_in_channels = num_features * (1 + self.fourier.num_features)
        self.time_mlp = nn.Sequential(
            nn.Linear(embedding_dim, cond_dim),
            nn.SiLU(),
            nn.Linear(cond_dim, cond_dim),
            nn.SiLU(),
        )
        self.conv_in = nn.Conv2d(conv_in_channels, embedding_dim, 3, padding=1)

        def maybe_attention() -> nn.Module:
            if attention_everywhere:
                return SpatialSelfAttention(embedding_dim, **attn)
            return nn.Identity()

        d = embedding_dim
        self.down = nn.ModuleList(ResnetBlock(d, d, **block) for _ in range(n_blocks))
        self.down_attn = nn.ModuleList(maybe_attention() for _ in range(n_blocks))
        self.mid1 = ResnetBlock(d, d, **block)
        self.mid_attn = SpatialSelfAttention(d, **attn)
        self.mid2 = ResnetBlock(d, d, **block)
        self.up = nn.ModuleList(ResnetBlock(2 * d, d, **block) for _ in range(n_blocks + 1))
        self.up_attn = nn.ModuleList(maybe_attention() for _ in range(n_blocks + 1))
        self.conv_out = nn.Sequential(GroupNorm32(norm_groups, d), nn.SiLU(), zero_init_(nn.Conv2d(d, d, 3, padding=1)))
        self.head = nn.Linear(num_features + d, in_channels * out_height)
        # built last, so the other parameters draw what the unconditional network draws
        self.num_labels = None if num_labels is None else check_int("num_labels", num_labels)
        self.label_embedding = None if num_labels is None else LabelEmbedding(num_labels, cond_dim)

    def forward(self, x: Tensor, t: Tensor, label: Tensor | None = None) -> Tensor:
        """x: (B, H, W, C) float (the input mean mu); t: (B,) in [0, 1]; label: (B,) long or None
        (no condition) -> (B, H, W, C, h)."""
        b, height, width, c = self._check_input(x)
        t = per_sample_time(t, b).float()
        cond = self.time_mlp(sin_cos_embedding((t + 0.001) * 1000.0, self.embedding_dim, method=self.time_frequencies))
        if self.label_embedding is None:
            check_unconditional(label)
        else:
            cond = cond + self.label_embedding(label, b, x.device).to(cond.dtype)  # (B, 4d)
        if self.input_features is not None:
            x = self.input_features(x, t)  # (B, H, W, F): replaces the input below

        x_nchw = x.permute(0, 3, 1, 2)  # (B, C, H, W)
        feats = x_nchw
        if self.fourier.freqs:  # fourier_exponents=() turns them off
            feats = torch.cat([x_nchw, self.fourier(x_nchw)], dim=1)  # (B, C*(1+2F), H, W)
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        feats = feats.contiguous(memory_format=layout)
        h = self.conv_in(feats)  # (B, d, H, W)

        skips = [h]
        for block, attn in zip(self.down, self.down_attn, strict=True):
            h = attn(block(h, cond))
            skips.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, cond)), cond)
        for block, attn in zip(self.up, self.up_attn, strict=True):
            h = attn(block(torch.cat([h, skips.pop()], dim=1), cond))

        out = self.conv_out(h).permute(0, 2, 3, 1)  # (B, H, W, d)
        out = linear_on_concat(self.head, [x, out])  # head([mu, out]) -> (B, H, W, C * h)
        return out.reshape(b, height, width, c, self.out_height)

    def _check_input(self, x: Tensor) -> tuple[int, int, int, int]:
        expected = (self.image_size, self.image_size, self.in_channels)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"net_inputs must have shape (B, {expected}), got {tuple(x.shape)}")
        return tuple(x.shape)
