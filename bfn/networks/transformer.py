"""Non-causal nanoGPT-style transformer used by the BFN reference for text8.

Data flow (paper config, B sequences of L=256 characters, K=27 classes)::

    theta (B,L,K) categorical input probabilities, t (B,)
      -> Linear(K -> 768)(2*theta - 1), computed as theta @ 2W^T + (b - W 1)
         + fixed sinusoidal position code (base 1000)
         + Linear(1 -> 768)(2t - 1)                        = x_in  (B,L,768)
         (+ a learned class-label embedding with ``num_labels``)
      -> 24 pre-LayerNorm blocks: x + Attn(LN(x)), x + MLP(LN(x))
         (12 heads, non-causal scaled_dot_product_attention, GELU-tanh MLP 4x wide)
      -> final LayerNorm                                   (B,L,768)
      -> concat with x_in (skip=True)                      (B,L,1536)
      -> lm_head Linear(1536 -> K)                         (B,L,K) logits

Large vocabularies: the token projection is evaluated as the embedding product theta @ E with
E = 2 W^T (K x d) plus the constant b - W 1, so no (B, L, K) temporary (2 theta - 1) is built or kept
for backward; ``tie_embeddings`` makes E the output head's weight (its first d columns when the head
also reads the skip features), saving K x d parameters.

Initialisation as in GPT-2/nanoGPT: every Linear N(0, 0.02) with zero bias, the two residual
output projections of each block N(0, 0.02/sqrt(2*n_layer)); LayerNorms weight 1, bias 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import LabelEmbedding, check_divides, check_dropout, check_int, check_unconditional


def sinusoidal_positions(seq_len: int, dim: int, base: float = 1000.0) -> Tensor:
    """Fixed position code (seq_len, dim): even columns sin(p / base^(i/dim)) for even i,
    odd columns cos(p / base^(i/dim)) for odd i (the reference uses base 1000, not 10000)."""
    pos = torch.arange(seq_len, dtype=torch.float32)[:, None]  # (L, 1)
    index = torch.arange(dim, dtype=torch.float32)  # (dim,)
    angles = pos / torch.pow(base, index / dim)  # (L, dim)
    code = torch.empty(seq_len, dim)
    code[:, 0::2] = torch.sin(angles[:, 0::2])
    code[:, 1::2] = torch.cos(angles[:, 1::2])
    return code


class TextInputAdapter(nn.Module):
    """theta (B,L,K), t (B,) or (B,L) -> token embeddings (B,L,d).

    The token projection is ``Linear(K -> d)(2 theta - 1)`` (the reference's), evaluated as
    ``theta @ (2 W)^T + (b - W 1)``: the same map without a K-wide temporary. With ``product`` it is
    ``theta @ W^T + b``, an embedding lookup averaged over theta: the reference's shift by -W 1 (a
    sum of K columns, 64x a column's size at K = 4,096) would drown the token signal for large K. With ``tied`` the
    adapter owns only the bias and ``forward`` takes W (d, K) from the caller (a view of the output
    head's weight). Positions are the fixed sinusoidal code, or with ``learn_positions`` a learned
    (seq_len, d) table (``position_embedding``, initialised N(0, 0.02)).
    """

    def __init__(
        self,
        num_classes: int,
        seq_len: int,
        width: int,
        bias: bool,
        learn_positions: bool = False,
        tied: bool = False,
        product: bool = False,
    ):
        super().__init__()
        self.seq_len = seq_len
        self.product = product
        self.token_proj = None if tied else nn.Linear(num_classes, width, bias=bias)
        self.token_bias = nn.Parameter(torch.zeros(width)) if tied and bias else None
        self.time_proj = nn.Linear(1, width, bias=bias)
        if learn_positions:
            self.position_embedding = nn.Embedding(seq_len, width)
            nn.init.normal_(self.position_embedding.weight, mean=0.0, std=0.02)
        else:
            self.position_embedding = None
            self.register_buffer("positions", sinusoidal_positions(seq_len, width), persistent=False)

    def forward(self, theta: Tensor, t: Tensor, tied_weight: Tensor | None = None) -> Tensor:
        b, length, _ = theta.shape
        t = t.to(theta.dtype).reshape(b, -1)  # (B, 1) or (B, L)
        if self.token_proj is None:
            if tied_weight is None:
                raise ValueError("a tied TextInputAdapter needs the output head's weight (tied_weight)")
            weight, bias = tied_weight, self.token_bias
        else:
            weight, bias = self.token_proj.weight, self.token_proj.bias
        if self.product:  # theta @ E: a one-hot theta looks its token up; a flat one gives the mean embedding
            tokens = F.linear(theta, weight, bias)  # (B, L, d)
        else:  # Linear(2 theta - 1) = theta (2 W)^T + (b - W 1)
            offset = -weight.sum(1) if bias is None else bias - weight.sum(1)
            tokens = F.linear(theta, 2 * weight, offset)  # (B, L, d)
        times = self.time_proj((2 * t - 1)[..., None])  # (B, 1 or L, d)
        if self.position_embedding is not None:
            return tokens + self.position_embedding.weight[:length].to(tokens.dtype) + times
        return tokens + self.positions[:length].to(tokens.dtype) + times


def _embedding_kind(value: str) -> str:
    if value not in ("reference", "product"):
        raise ValueError(f"input_embedding must be 'reference' or 'product', got {value!r}")
    return value


class SelfAttention(nn.Module):
    """Multi-head self-attention; q, k, v come from one Linear(d -> 3d) as [q | k | v]."""

    def __init__(self, width: int, n_head: int, dropout: float, bias: bool, is_causal: bool):
        super().__init__()
        self.n_head = n_head
        self.dropout = dropout
        self.is_causal = is_causal
        self.c_attn = nn.Linear(width, 3 * width, bias=bias)
        self.c_proj = nn.Linear(width, width, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, length, width = x.shape
        qkv = self.c_attn(x).view(b, length, 3, self.n_head, width // self.n_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, L, head_dim)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=self.is_causal
        )
        y = y.transpose(1, 2).reshape(b, length, width)  # (B, L, d)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Linear(d -> 4d), GELU (tanh approximation), Linear(4d -> d), dropout."""

    def __init__(self, width: int, dropout: float, bias: bool):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width, bias=bias)
        self.c_proj = nn.Linear(4 * width, width, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, width: int, n_head: int, dropout: float, bias: bool, is_causal: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=1e-5, bias=bias)
        self.attn = SelfAttention(width, n_head, dropout, bias, is_causal)
        self.ln_2 = nn.LayerNorm(width, eps=1e-5, bias=bias)
        self.mlp = MLP(width, dropout, bias)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TextTransformer(nn.Module):
    """Non-causal GPT; ``net(theta, t)`` maps (B,L,K), (B,) -> (B,L,K) logits.

    Args (defaults = the paper's text8 config, 170.18M parameters):
        num_classes: K, the vocabulary size (27 for text8).
        seq_len: maximum sequence length L (the position code is built for it).
        n_layer, n_head, n_embd: depth, heads and width.
        dropout: dropout on the input embedding, attention weights and residual branches.
        bias: biases in every Linear and LayerNorm.
        skip: concatenate the input embedding with the final features before lm_head.
        is_causal: causal attention (the reference BFN uses False; skip is then disabled).
        adapter_bias: biases in the input token and time projections (None: ``bias``; the
            reference has them whatever ``bias`` says).
        learn_positions: a learned position table instead of the fixed sinusoidal code.
        output_projection: if set, lm_head emits this many values per token and a further
            Linear (``output_proj``, the reference's output adapter) maps them to the K logits.
        tie_embeddings: the input token embedding E (K x d) is lm_head's weight (its first d
            columns with ``skip``); not with ``output_projection`` (the head then is not K-wide).
        input_embedding: "reference" (Linear(K -> d) on 2 theta - 1, the official network) or
            "product" (theta @ E: no offset growing with K; for large vocabularies).
        num_labels: class-conditional network: an embedding of ``num_labels`` + 1 rows (the
            last: no condition), N(0, 0.02), added to the input embedding of every token; None
            (default) builds the unconditional network, parameter for parameter and draw for draw.
    """

    def __init__(
        self,
        *,
        num_classes: int = 27,
        seq_len: int = 256,
        n_layer: int = 24,
        n_head: int = 12,
        n_embd: int = 768,
        dropout: float = 0.0,
        bias: bool = True,
        skip: bool = True,
        is_causal: bool = False,
        adapter_bias: bool | None = None,
        learn_positions: bool = False,
        output_projection: int | None = None,
        tie_embeddings: bool = False,
        num_labels: int | None = None,
        input_embedding: str = "reference",
    ):
        super().__init__()
        self.num_classes = check_int("num_classes", num_classes, minimum=2)
        self.seq_len = check_int("seq_len", seq_len)
        self.n_layer = check_int("n_layer", n_layer)
        check_int("n_head", n_head)
        check_int("n_embd", n_embd)
        check_divides("n_head", n_head, "n_embd", n_embd)
        dropout = check_dropout("dropout", dropout)
        self.is_causal = bool(is_causal)
        self.skip = bool(skip) and not self.is_causal

        self.tie_embeddings = bool(tie_embeddings)
        if self.tie_embeddings and output_projection is not None:
            raise ValueError("tie_embeddings needs lm_head to emit the K logits: set output_projection to None")
        adapter_bias = bias if adapter_bias is None else adapter_bias
        self.input_adapter = TextInputAdapter(
            num_classes,
            seq_len,
            n_embd,
            bool(adapter_bias),
            learn_positions=bool(learn_positions),
            tied=self.tie_embeddings,
            product=_embedding_kind(input_embedding) == "product",
        )
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout, bias, self.is_causal) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, eps=1e-5, bias=bias)
        head_out = num_classes
        self.output_proj = None
        if output_projection is not None:
            head_out = check_int("output_projection", output_projection)
            self.output_proj = nn.Linear(head_out, num_classes)
        self.lm_head = nn.Linear(2 * n_embd if self.skip else n_embd, head_out, bias=bias)
        self._init_weights()
        # built after the init, so the other parameters draw what the unconditional network draws
        self.num_labels = None if num_labels is None else check_int("num_labels", num_labels)
        self.label_embedding = None if num_labels is None else LabelEmbedding(num_labels, n_embd, std=0.02)

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        residual_std = 0.02 / math.sqrt(2 * self.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.c_proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.c_proj.weight, mean=0.0, std=residual_std)

    def forward(self, theta: Tensor, t: Tensor, label: Tensor | None = None) -> Tensor:
        """theta: (B, L, K) probabilities; t: (B,) (or per token (B, L)); label: (B,) long or None
        (no condition) -> (B, L, K) logits."""
        self._check_input(theta, t)
        x_in = self.input_adapter(theta, t, self._tied_weight())  # (B, L, d)
        if self.label_embedding is None:
            check_unconditional(label)
        else:
            x_in = x_in + self.label_embedding(label, theta.shape[0], theta.device)[:, None].to(x_in.dtype)
        x = self.drop(x_in)
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        if self.skip:
            x = torch.cat([x, x_in], dim=-1)  # (B, L, 2d)
        if self.output_proj is not None:
            return self.output_proj(self.lm_head(x))
        return self.lm_head(x)

    def _tied_weight(self) -> Tensor | None:
        """W (d, K) of the input token projection when tied: lm_head's weight on the final features."""
        if not self.tie_embeddings:
            return None
        return self.lm_head.weight[:, : self.input_adapter.time_proj.out_features].T

    def embedding_parameters(self) -> list[nn.Parameter]:
        """Input-embedding parameters (token and time projections, the label table if any;
        positions are a fixed buffer). Tied, the token embedding is lm_head's weight and counts as
        the head's."""
        labels = [] if self.label_embedding is None else list(self.label_embedding.parameters())
        return list(self.input_adapter.parameters()) + labels

    def optim_groups(self, weight_decay: float) -> list[dict]:
        """AdamW parameter groups: decay on Linear weights only; biases and LayerNorm weights get
        none (like the reference GPT.get_optim_groups)."""
        linear_weights = {id(m.weight) for m in self.modules() if isinstance(m, nn.Linear)}
        decay, no_decay = [], []
        for p in self.parameters():
            (decay if id(p) in linear_weights else no_decay).append(p)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    get_optim_groups = optim_groups  # the reference's name

    def _check_input(self, theta: Tensor, t: Tensor) -> None:
        if theta.dim() != 3 or theta.shape[-1] != self.num_classes:
            raise ValueError(f"net_inputs must have shape (B, L, {self.num_classes}), got {tuple(theta.shape)}")
        b, length, _ = theta.shape
        if length > self.seq_len:
            raise ValueError(f"sequence length {length} exceeds seq_len={self.seq_len}")
        if t.dim() == 0 or t.shape[0] != b or t[0].numel() not in (1, length):
            raise ValueError(f"t must have shape (B,) or (B, L), got {tuple(t.shape)}")
