"""Building blocks shared by the BFN networks.

Everything here is plain PyTorch:

* argument checks that raise ``ValueError`` naming the offending argument;
* ``GroupNorm32`` (always computed in float32) with a channels-last CPU path, ``GroupNormNHWC``;
* ``Dropout`` with a cheaper CPU mask sampler;
* ``linear_on_concat``, a Linear layer applied to a concatenation without building it;
* the two sinusoidal time embeddings of the reference nets, zero initialisation, and a spatial
  self-attention block built on ``F.scaled_dot_product_attention``;
* ``LabelEmbedding``, the class-label table of conditional networks (with a "no condition" row).

Image tensors inside the U-Nets are logically NCHW; when ``channels_last`` is on they are stored
NHWC in memory, which is what the oneDNN convolutions on CPU prefer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ----------------------------------------------------------------------------- argument checks


def check_int(name: str, value, minimum: int = 1) -> int:
    """Return ``value`` if it is an int >= ``minimum``, else raise ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_dropout(name: str, value) -> float:
    """Return ``value`` as float if it is a probability in [0, 1), else raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {value!r}")
    return float(value)


def check_divides(name: str, divisor: int, what: str, value: int) -> None:
    """Raise ValueError naming ``name`` unless ``divisor`` divides ``value``."""
    if value % divisor != 0:
        raise ValueError(f"{name}={divisor} must divide {what}={value}")


def check_int_tuple(name: str, value, minimum: int = 1, allow_empty: bool = False) -> tuple:
    """Return ``value`` as a tuple of ints >= ``minimum``, else raise ValueError naming ``name``."""
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be a sequence of integers, got {value!r}")
    items = tuple(value)
    if not items and not allow_empty:
        raise ValueError(f"{name} must not be empty")
    for item in items:
        check_int(name, item, minimum)
    return items


def per_sample_time(t: Tensor, batch: int) -> Tensor:
    """Return the time as a float tensor of shape (B,).

    ``t`` is normally (B,); a data-shaped t (B, ...) is accepted too, and its first entry per
    sample is used, as the reference does (all entries of one sample are equal there).
    """
    if t.dim() == 0 or t.shape[0] != batch:
        raise ValueError(f"t must have shape (B,) with B={batch}, got {tuple(t.shape)}")
    if t.dim() > 1:
        t = t.reshape(batch, -1)[:, 0]
    return t if t.is_floating_point() else t.float()


class LabelEmbedding(nn.Module):
    """Class labels (B,) -> (B, dim), for conditional networks (classifier-free guidance).

    ``num_labels + 1`` rows: row ``num_labels`` is the learned "no condition" entry, used where
    the label is None (unconditional calls, and the dropped labels of training).
    """

    def __init__(self, num_labels: int, dim: int, std: float = 1.0):
        super().__init__()
        self.num_labels = check_int("num_labels", num_labels)
        self.table = nn.Embedding(num_labels + 1, dim)
        nn.init.normal_(self.table.weight, mean=0.0, std=std)

    def forward(self, label: Tensor | None, batch: int, device: torch.device) -> Tensor:
        if label is None:
            label = torch.full((batch,), self.num_labels, dtype=torch.long, device=device)
        elif label.shape != (batch,) or label.dtype.is_floating_point or label.dtype == torch.bool:
            raise ValueError(
                f"label must be integer class ids of shape ({batch},), got {label.dtype} {tuple(label.shape)}"
            )
        elif label.device.type == "cpu" and label.numel() and (label.min() < 0 or label.max() > self.num_labels):
            # range read back only where that costs no device sync (the BFN checks it otherwise)
            raise ValueError(f"label must lie in [0, {self.num_labels}] ({self.num_labels}: no condition)")
        return self.table(label)  # (B, dim)


def check_unconditional(label: Tensor | None) -> None:
    """A network built without ``num_labels`` takes no label."""
    if label is not None:
        raise ValueError("label given to a network built without num_labels (an unconditional network)")


# ----------------------------------------------------------------------------- normalisation


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that always computes in float32.

    A float32 input goes straight to the kernel (no cast, no copy); float16/bfloat16 inputs are
    normalised in float32 and cast back. Channels-last CPU inputs use ``GroupNormNHWC``, because
    PyTorch's channels-last CPU kernel is several times slower than its NCHW one when there are
    few channels per group.
    """

    def forward(self, x: Tensor) -> Tensor:
        low_precision = x.dtype in (torch.float16, torch.bfloat16)
        xf = x.float() if low_precision else x
        if _use_nhwc_kernel(xf):
            out = GroupNormNHWC.apply(xf, self.weight, self.bias, self.num_groups, self.eps)
        else:
            weight = self.weight.float() if low_precision else self.weight
            bias = self.bias.float() if low_precision else self.bias
            out = F.group_norm(xf, self.num_groups, weight, bias, self.eps)
        return out.to(x.dtype) if low_precision else out


def _use_nhwc_kernel(x: Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dim() == 4
        and x.dtype in (torch.float32, torch.float64)
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    )


class GroupNormNHWC(torch.autograd.Function):
    """Affine GroupNorm of a channels-last (B, C, H, W) tensor, from vectorised reductions.

    Viewed as (B, HW, C) the tensor is contiguous, so per-channel sums over HW are cheap; the
    group statistics are combined from them. The variance comes from one pass (E[x^2] - mean^2)
    unless some group has |mean| > ~30 std, where that loses precision; then it is recomputed
    around the mean. The backward pass uses the closed form
    dx = rstd * (w*g - mean_grp(w*g) - xhat * mean_grp(w*g*xhat)).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float) -> Tensor:
        b, c, h, w = x.shape
        xv = x.permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, HW, C), a view
        n = h * w * (c // groups)  # elements per group
        mean = _group_sum(xv.sum(1), groups) / n  # (B, C): the group mean of each channel
        var = _group_sum((xv * xv).sum(1), groups) / n - mean * mean  # (B, C)
        if bool((var < 1e-3 * mean * mean).any()):  # cancellation: use the centred data
            centred = xv - mean[:, None]
            var = _group_sum((centred * centred).sum(1), groups) / n
        rstd = torch.rsqrt(var.clamp_min(0) + eps)
        scale = rstd if weight is None else rstd * weight  # (B, C)
        shift = -mean * scale if bias is None else bias - mean * scale
        out = torch.addcmul(shift[:, None], xv, scale[:, None])  # (B, HW, C)
        ctx.save_for_backward(x, mean, rstd, weight)
        ctx.groups, ctx.has_bias = groups, bias is not None
        return out.view(b, h, w, c).permute(0, 3, 1, 2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, mean, rstd, weight = ctx.saved_tensors
        b, c, h, w = x.shape
        n = h * w * (c // ctx.groups)
        xv = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
        g = grad_out.contiguous(memory_format=torch.channels_last)
        g = g.permute(0, 2, 3, 1).reshape(b, h * w, c)
        sum_g = g.sum(1)  # (B, C)
        sum_g_xhat = ((g * xv).sum(1) - mean * sum_g) * rstd  # (B, C): sum over HW of g * xhat
        wt = torch.ones_like(rstd[0]) if weight is None else weight
        mean_wg = _group_sum(wt * sum_g, ctx.groups) / n  # (B, C)
        mean_wg_xhat = _group_sum(wt * sum_g_xhat, ctx.groups) / n  # (B, C)
        # dx = a*g + k*(x - mean) + m = a*g + k*x + (m - k*mean), per (B, C)
        a = rstd * wt
        k = -rstd * rstd * mean_wg_xhat
        m = -rstd * mean_wg - k * mean
        dx = torch.addcmul(m[:, None], xv, k[:, None]).addcmul_(g, a[:, None])
        dx = dx.view(b, h, w, c).permute(0, 3, 1, 2)
        dweight = sum_g_xhat.sum(0) if weight is not None and ctx.needs_input_grad[1] else None
        dbias = sum_g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dweight, dbias, None, None


def _group_sum(per_channel: Tensor, groups: int) -> Tensor:
    """(B, C) per-channel values -> (B, C) sum over each channel's group."""
    b, c = per_channel.shape
    sums = per_channel.view(b, groups, c // groups).sum(-1, keepdim=True)  # (B, G, 1)
    return sums.expand(b, groups, c // groups).reshape(b, c)


def zero_init_(module: nn.Module) -> nn.Module:
    """Set every parameter of ``module`` to zero and return it."""
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    return module


def linear_on_concat(layer: nn.Linear, parts: Sequence[Tensor]) -> Tensor:
    """``layer(torch.cat(parts, dim=-1))`` without building the concatenation.

    Each part is multiplied by its own block of columns of the weight, which saves writing (and
    back-propagating through) one large tensor when the parts are per-pixel feature maps.
    """
    widths = [part.shape[-1] for part in parts]
    if sum(widths) != layer.in_features:
        raise ValueError(f"parts have {sum(widths)} features in total, need {layer.in_features}")
    blocks = layer.weight.split(widths, dim=1)  # column blocks, views of the weight
    out = F.linear(parts[0], blocks[0], layer.bias)
    for part, block in zip(parts[1:], blocks[1:], strict=True):
        out = out + F.linear(part, block)
    return out


# ----------------------------------------------------------------------------- dropout

_MASK_BITS = 15  # resolution of the CPU dropout mask: p is rounded to a multiple of 2^-15


def dropout_noise(x: Tensor, p: float) -> Tensor:
    """Inverted-dropout noise shaped and laid out like ``x``: 0 with probability ~p, else 1/(1-p).

    The mask comes from 15-bit chunks of 64-bit random integers (four per draw of torch's
    default generator, so ``torch.manual_seed`` still makes it reproducible). On CPU this is
    ~4x cheaper than ``bernoulli_``, which draws one random number per element. ``p`` is rounded
    to a multiple of 2^-15 and the scale uses the rounded value, so the noise has mean exactly 1.
    """
    threshold = min(round(p * 2**_MASK_BITS), 2**_MASK_BITS - 1)
    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_()
    chunks = words.view(torch.int16)[:n]  # random_() leaves the top bit of each word 0
    keep = (chunks & (2**_MASK_BITS - 1)) >= threshold
    scale = 2**_MASK_BITS / (2**_MASK_BITS - threshold)
    noise = keep.to(x.dtype).mul_(scale)
    if x.is_contiguous():
        return noise.view(x.shape)
    return noise.as_strided(x.shape, x.stride())  # channels_last: i.i.d., so any order works


class Dropout(nn.Dropout):
    """``nn.Dropout`` with a faster mask sampler on CPU (see ``dropout_noise``).

    Other devices use ``F.dropout`` unchanged. For p = 0.5 the two are equal in distribution;
    for other p the CPU version rounds p to a multiple of 2^-15.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or self.inplace or not _is_dense(x):
            return super().forward(x)
        return x * dropout_noise(x, self.p)


def _is_dense(x: Tensor) -> bool:
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    return channels_last or x.is_contiguous()


# ----------------------------------------------------------------------------- time embeddings


def cos_sin_embedding(timesteps: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """improved-diffusion embedding: (B,) -> (B, dim) = [cos(t f_i), sin(t f_i)].

    Frequencies f_i = max_period^(-i/half) for i = 0..half-1 (half = dim // 2); an odd ``dim``
    gets one trailing zero column.
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    freqs = torch.exp(-math.log(max_period) * exponent)  # (half,)
    args = timesteps.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def sin_cos_embedding(timesteps: Tensor, dim: int, max_timescale: float = 10_000.0, method: str = "exp") -> Tensor:
    """VDM embedding: (B,) -> (B, dim) = [sin(t f_i), cos(t f_i)], ``dim`` even.

    Frequencies are log-spaced from 1 down to 1/max_timescale, both ends included:
    f_i = max_timescale^(-i/(half-1)), computed as exp(...) or (``method="logspace"``) with
    torch.logspace like the reference, which differs by a few float32 ulps.
    """
    half = dim // 2
    if method == "logspace":
        freqs = torch.logspace(0.0, -math.log10(max_timescale), half, device=timesteps.device)
    else:
        steps = torch.arange(half, dtype=torch.float32, device=timesteps.device) / max(half - 1, 1)
        freqs = torch.exp(-math.log(max_timescale) * steps)  # (half,)
    args = timesteps.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


# ----------------------------------------------------------------------------- attention


class SpatialSelfAttention(nn.Module):
    """Residual multi-head self-attention over the pixels of an image: x + proj(attn(norm(x))).

    The qkv projection is a per-pixel Linear(C -> 3C). ``qkv_layout`` says how its 3C outputs are
    split into heads, so that weights stay interchangeable with the reference implementations:
    ``"head_qkv"`` (improved-diffusion: per head [q, k, v]) or ``"qkv_head"`` (VDM: [q | k | v],
    each split into heads). The output projection is zero-initialised, so the block starts as
    the identity. Softmax scale is 1/sqrt(head_dim).
    """

    def __init__(self, channels: int, num_heads: int, norm_groups: int, qkv_layout: str):
        super().__init__()
        check_divides("num_heads", num_heads, "channels", channels)
        if qkv_layout not in ("head_qkv", "qkv_head"):
            raise ValueError(f"qkv_layout must be 'head_qkv' or 'qkv_head', got {qkv_layout!r}")
        self.num_heads = num_heads
        self.qkv_layout = qkv_layout
        self.norm = GroupNorm32(norm_groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj_out = zero_init_(nn.Linear(channels, channels))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, T, C)
        qkv = self.qkv(tokens)  # (B, T, 3C)
        head_dim = c // self.num_heads
        if self.qkv_layout == "head_qkv":
            qkv = qkv.view(b, h * w, self.num_heads, 3, head_dim).permute(3, 0, 2, 1, 4)
        else:
            qkv = qkv.view(b, h * w, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, T, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, head_dim)
        out = self.proj_out(out.transpose(1, 2).reshape(b, h * w, c))  # (B, T, C)
        out = out.view(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, H, W), channels_last memory
        return x + out


# ----------------------------------------------------------------------------- image input features


class ImageInputFeatures(nn.Module):
    """Per-pixel input features of an image net, as the reference's image input adapter builds them.

    (B, H, W, C) values and t (B,) -> (B, H, W, num_features), the concatenation of

    * the C values;
    * if ``time``: 2t - 1, followed (if ``time_frequency`` > 0) by 2 * ``num_bands`` sinusoids of
      t * time_frequency (a transformer position code with base 10000: sin in even columns, cos in
      odd ones);
    * ``positions``: ``"none"``; ``"fourier"``, fixed features of the pixel coordinates u, v in
      [-1, 1]: sin and cos of pi * u * f and pi * v * f for ``num_bands`` frequencies f per axis,
      linearly spaced from 1 to half the axis length, then u and v (4 * num_bands + 2 features);
      or ``"learned"``, ``position_dim`` learned values per pixel (``positions``, (1, H*W, dim));

    then, if ``out_features`` is set, a per-pixel Linear (``projection``) to that many features.
    With the defaults (values and 2t - 1) the module has no parameters or persistent buffers.
    """

    POSITIONS = ("none", "fourier", "learned")

    def __init__(
        self,
        in_channels: int,
        image_shape: Sequence[int],
        *,
        time: bool = True,
        time_frequency: float = 0.0,
        num_bands: int = 64,
        positions: str = "none",
        position_dim: int = 32,
        position_init_scale: float = 0.02,
        out_features: int | None = None,
    ):
        super().__init__()
        self.in_channels = check_int("in_channels", in_channels)
        height, width = check_int_tuple("image_shape", image_shape)
        self.image_shape = (height, width)
        self.time = bool(time)
        if isinstance(time_frequency, bool) or not isinstance(time_frequency, int | float):
            raise ValueError(f"time_frequency must be a number, got {time_frequency!r}")
        self.time_frequency = float(time_frequency)
        self.num_bands = check_int("num_bands", num_bands, minimum=0)
        if positions not in self.POSITIONS:
            raise ValueError(f"positions must be one of {self.POSITIONS}, got {positions!r}")
        self.positions_kind = positions
        num_features = in_channels
        if self.time:
            num_features += 1 + (2 * self.num_bands if self.time_frequency > 0 else 0)
        if positions == "fourier":
            code = fourier_position_features(height, width, self.num_bands)
            self.register_buffer("positions", code, persistent=False)  # (H*W, 4 * bands + 2)
            num_features += code.shape[-1]
        elif positions == "learned":
            check_int("position_dim", position_dim)
            init = position_init_scale * torch.randn(1, height * width, position_dim)
            self.positions = nn.Parameter(init)
            num_features += position_dim
        self.projection = None
        if out_features is not None:
            check_int("out_features", out_features)
            self.projection = nn.Linear(num_features, out_features)
            num_features = out_features
        self.num_features = num_features

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """x: (B, H, W, C); t: (B,) float -> (B, H, W, num_features)."""
        b, height, width, _ = x.shape
        parts = [x]
        if self.time:
            t_feat = (t * 2 - 1).to(x.dtype).view(b, 1)  # (B, 1)
            if self.time_frequency > 0 and self.num_bands:
                t_feat = torch.cat([t_feat, self._time_code(t_feat).to(x.dtype)], dim=-1)
            parts.append(t_feat.view(b, 1, 1, -1).expand(b, height, width, t_feat.shape[-1]))
        if self.positions_kind != "none":
            code = self.positions.reshape(height, width, -1).to(x.dtype)
            parts.append(code.expand(b, height, width, code.shape[-1]))
        features = torch.cat(parts, dim=-1) if len(parts) > 1 else x
        return features if self.projection is None else self.projection(features)

    def _time_code(self, t_feat: Tensor) -> Tensor:
        """(B, 1) 2t - 1 -> (B, 2 * num_bands): sin/cos of t * time_frequency / 10000^(i / dim)."""
        dim = 2 * self.num_bands
        pos = ((t_feat.float() + 1) / 2) * self.time_frequency  # (B, 1): t * time_frequency
        even = torch.arange(0, dim, 2, dtype=torch.float32, device=t_feat.device) / dim
        odd = torch.arange(1, dim, 2, dtype=torch.float32, device=t_feat.device) / dim
        code = torch.empty(t_feat.shape[0], dim, device=t_feat.device)
        code[:, 0::2] = torch.sin(pos / torch.pow(10000, even))
        code[:, 1::2] = torch.cos(pos / torch.pow(10000, odd))
        return code


def fourier_position_features(height: int, width: int, num_bands: int) -> Tensor:
    """Fixed pixel-coordinate features (H*W, 4 * num_bands + 2), rows in raster order (h, w):
    [sin(pi u f_j), sin(pi v g_j), cos(pi u f_j), cos(pi v g_j), u, v] with u, v in [-1, 1] the
    row and column coordinates and f_j, g_j linearly spaced from 1 to height/2, width/2."""
    u = torch.linspace(-1.0, 1.0, steps=height)
    v = torch.linspace(-1.0, 1.0, steps=width)
    coords = torch.stack(torch.meshgrid(u, v, indexing="ij"), dim=-1).reshape(-1, 2)  # (HW, 2)
    bands = torch.stack(
        (torch.linspace(1.0, height / 2, steps=num_bands), torch.linspace(1.0, width / 2, steps=num_bands))
    )  # (2, bands)
    angles = math.pi * (coords[:, :, None] * bands[None]).reshape(coords.shape[0], -1)
    return torch.cat([angles.sin(), angles.cos(), coords], dim=-1)
