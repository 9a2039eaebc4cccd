"""
A compact Vision Transformer with three kinds of self-attention:
1) classic multi-head attention (Vaswani et al. 2017, Dosovitskiy et al. 2020)
2) Differential Attention (Ye et al. 2024, "Differential Transformer", arXiv 2410.05258),
   as defined by the paper and the authors' reference code (microsoft/unilm, Diff-Transformer)
3) Differential Attention V2 (Ye et al., "Differential Transformer V2", January 2026), as in the authors' code
   (microsoft/unilm, Diff-Transformer/Diff-Transformer-V2/multihead_flashdiffv2.py)
Each can normalise its queries and keys (qk_norm, Dehghani et al. 2023), which bounds the attention logits.
"""

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class ViTConfig:
    """
    n_head counts heads of width d = n_embd / n_head, and means per attention kind (ATTENTIONS):
        classic  n_head heads of width d
        diff     n_head / 2 differential heads, each with two query/key groups of width d and a value of width 2d
        diff2    n_head heads, each with two queries that share one key and one value of width d
    """
    image_size: int = 28
    in_channels: int = 1
    num_classes: int = 10
    patch_size: int = 4
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    mlp_dim: int = 128
    dropout: float = 0.0
    attention: str = 'diff'  # a key of ATTENTIONS
    qk_norm: bool = False  # RMSNorm (learned gain) on every query and key head before the dot product
    attn_impl: str = 'auto'  # 'fused' (scaled_dot_product_attention), 'explicit', or 'auto': fused on CUDA only

    def __post_init__(self):
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention={self.attention!r}: must be one of {', '.join(ATTENTIONS)}")
        if self.attn_impl not in ('auto', 'fused', 'explicit'):
            raise ValueError(f"attn_impl={self.attn_impl!r}: must be 'auto', 'fused' or 'explicit'")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.attention == 'diff' and self.n_head % 2:
            raise ValueError(f"n_head={self.n_head} is odd: differential attention pairs two classic heads "
                             "into one differential head, so n_head must be even")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout}: must be in [0, 1)")


class PatchEmbed(nn.Module):
    """Cuts the image into non-overlapping patches and projects each one to n_embd."""

    def __init__(self, config):
        super().__init__()
        self.proj = nn.Conv2d(config.in_channels, config.n_embd, config.patch_size, stride=config.patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, num_patches, n_embd)


def qk_norms(config, head_dim):
    """With qk_norm, an RMSNorm over each query head and one over each key head (gains of width d shared by the
    heads): |logit| <= d / √d · the gains' scale, however large the weights grow. Without it, the identity."""
    if not config.qk_norm:
        return nn.Identity(), nn.Identity()
    return nn.RMSNorm(head_dim, eps=1e-6), nn.RMSNorm(head_dim, eps=1e-6)


def use_explicit(attn, x, return_attn):
    # the fused kernels pay off on CUDA; on the CPU, at tens of tokens, the explicit matmul-softmax is faster in
    # bfloat16 (1.1-2.7x per training step in bench.py) and about even in float32. Quantized logits need it.
    return (return_attn or attn.quantize_logits is not None or attn.attn_impl == 'explicit'
            or (attn.attn_impl == 'auto' and not x.is_cuda))


def attention_weights(attn, *logits):
    """The softmax over the keys of each of a layer's maps, in float32 under autocast too, as the fused kernels do.
    eval.py's quantization test sets attn.quantize_logits: a function of the logits of every map of the layer at once,
    (B, maps, T, T) as logits() gives them, applied first."""
    if attn.quantize_logits is not None:
        logits = attn.quantize_logits(torch.cat(logits, dim=1)).split(logits[0].size(1), dim=1)
    return [torch.softmax(x, dim=-1, dtype=torch.float32) for x in logits]


class Attention(nn.Module):
    """Classic multi-head self-attention: softmax(Q Kᵀ / √d) V per head."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.n_head = config.n_head
        self.attn_impl = config.attn_impl
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.q_norm, self.k_norm = qk_norms(config, config.n_embd // config.n_head)
        self.quantize_logits = None

    def split_heads(self, x):
        B, T, C = x.size()
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)  # each (B, nh, T, d)
        return self.q_norm(q), self.k_norm(k), v

    def logits(self, x):
        """Q Kᵀ / √d, the attention logits before the softmax: (B, nh, T, T)."""
        q, k, _ = self.split_heads(x)
        return q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))

    def forward(self, x, return_attn=False):
        B, T, C = x.size()
        q, k, v = self.split_heads(x)
        if use_explicit(self, x, return_attn):
            att, = attention_weights(self, q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)))
            y = att @ v
        else:
            att = None
            y = F.scaled_dot_product_attention(q, k, v)  # fused kernel, never materialises the T x T map
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.proj(y), att


def lambda_init_fn(layer_idx):
    # the paper's schedule; layer_idx is 0-based, so the first layer starts at 0.2
    return 0.8 - 0.6 * math.exp(-0.3 * layer_idx)


class DiffAttention(nn.Module):
    """
    Differential attention. n_head counts classic heads; this layer has h = n_head // 2 differential heads.
    Each splits its query and key into two groups of width d = n_embd // n_head and has a value of width 2d:
        [Q1; Q2] = X Wq,  [K1; K2] = X Wk,  V = X Wv
        A = softmax(Q1 K1ᵀ / √d) − λ softmax(Q2 K2ᵀ / √d)
        λ = exp(λq1 · λk1) − exp(λq2 · λk2) + λ_init
        head = (1 − λ_init) · RMSNorm(A V)
    The projections have exactly the shapes of the classic layer's.
    """

    def __init__(self, config, layer_idx):
        super().__init__()
        self.n_head = config.n_head // 2
        self.head_dim = config.n_embd // config.n_head  # d: width of one query/key group
        self.attn_impl = config.attn_impl
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.lambda_init = lambda_init_fn(layer_idx)
        self.lambda_q1 = nn.Parameter(torch.randn(self.head_dim) * 0.1)
        self.lambda_k1 = nn.Parameter(torch.randn(self.head_dim) * 0.1)
        self.lambda_q2 = nn.Parameter(torch.randn(self.head_dim) * 0.1)
        self.lambda_k2 = nn.Parameter(torch.randn(self.head_dim) * 0.1)
        self.subln = nn.RMSNorm(2 * self.head_dim, eps=1e-5)  # head-wise: normalises each head on its own
        self.q_norm, self.k_norm = qk_norms(config, self.head_dim)  # one norm for Q1 and Q2, one for K1 and K2
        self.quantize_logits = None

    def lambda_full(self):
        return (torch.exp(torch.dot(self.lambda_q1, self.lambda_k1))
                - torch.exp(torch.dot(self.lambda_q2, self.lambda_k2))
                + self.lambda_init)

    def split_heads(self, x):
        B, T, C = x.size()
        h, d = self.n_head, self.head_dim
        q, k, v = self.qkv(x).split(C, dim=2)
        q1, q2 = self.q_norm(q.view(B, T, h, 2, d)).permute(3, 0, 2, 1, 4)  # each (B, h, T, d)
        k1, k2 = self.k_norm(k.view(B, T, h, 2, d)).permute(3, 0, 2, 1, 4)
        v = v.view(B, T, h, 2 * d).transpose(1, 2)  # (B, h, T, 2d)
        return q1, q2, k1, k2, v

    def logits(self, x):
        """Q1 K1ᵀ / √d and Q2 K2ᵀ / √d, the logits of both softmaxes: (B, 2h, T, T), every first map, then every second."""
        q1, q2, k1, k2, _ = self.split_heads(x)
        return torch.cat([q1 @ k1.transpose(-2, -1), q2 @ k2.transpose(-2, -1)], dim=1) / math.sqrt(self.head_dim)

    def forward(self, x, return_attn=False):
        B, T, C = x.size()
        d = self.head_dim
        q1, q2, k1, k2, v = self.split_heads(x)
        lam = self.lambda_full()
        if use_explicit(self, x, return_attn):
            # the difference in float32 under autocast too: it cancels most of the mass
            att1, att2 = attention_weights(self, q1 @ k1.transpose(-2, -1) / math.sqrt(d),
                                           q2 @ k2.transpose(-2, -1) / math.sqrt(d))
            att = att1 - lam * att2
            y = att @ v
        else:
            att = None
            # A V = softmax1 V − λ softmax2 V: two fused calls, no T x T map in memory
            y = F.scaled_dot_product_attention(q1, k1, v) - lam * F.scaled_dot_product_attention(q2, k2, v)
        # normalised in float32, the dtype of its weight, so that RMSNorm runs its fused kernel under autocast too
        y = self.subln(y.float()).type_as(y) * (1 - self.lambda_init)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.proj(y), att


class DiffAttentionV2(nn.Module):
    """
    Differential attention V2. n_head heads of width d = n_embd // n_head; each has two queries that share one key
    and one value (query heads 2i and 2i+1 of 2·n_head, grouped-query style), and a λ of its own for every token:
        [Q1; Q2] = X Wq,  K = X Wk,  V = X Wv,  λ_t = sigmoid(x_t Wλ)   (Wλ: n_embd -> n_head, no bias)
        head = softmax(Q1 Kᵀ / √d) V − λ ⊙ softmax(Q2 Kᵀ / √d) V
    No per-head norm, no λ_init, no (1 − λ_init) factor; the heads concatenate to n_embd for the output projection.
    Wq is twice the classic layer's and Wλ is new: n_embd · (n_embd + n_head) + n_embd more parameters per layer.
    """

    def __init__(self, config, layer_idx):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.attn_impl = config.attn_impl
        self.q = nn.Linear(config.n_embd, 2 * config.n_embd)
        self.kv = nn.Linear(config.n_embd, 2 * config.n_embd)
        self.lambda_proj = nn.Linear(config.n_embd, config.n_head, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.q_norm, self.k_norm = qk_norms(config, self.head_dim)
        self.quantize_logits = None

    def lambda_full(self, x):
        """λ per token and head, (B, h, T, 1), in float32."""
        return torch.sigmoid(self.lambda_proj(x).float()).transpose(1, 2).unsqueeze(-1)

    def split_heads(self, x):
        B, T, C = x.size()
        h, d = self.n_head, self.head_dim
        q1, q2 = self.q_norm(self.q(x).view(B, T, h, 2, d)).permute(3, 0, 2, 1, 4)  # each (B, h, T, d)
        k, v = self.kv(x).view(B, T, 2, h, d).permute(2, 0, 3, 1, 4)
        return q1, q2, self.k_norm(k), v

    def logits(self, x):
        """Q1 Kᵀ / √d and Q2 Kᵀ / √d, the logits of both softmaxes: (B, 2h, T, T), every first map, then every second."""
        q1, q2, k, _ = self.split_heads(x)
        return torch.cat([q1 @ k.transpose(-2, -1), q2 @ k.transpose(-2, -1)], dim=1) / math.sqrt(self.head_dim)

    def forward(self, x, return_attn=False):
        B, T, C = x.size()
        d = self.head_dim
        q1, q2, k, v = self.split_heads(x)
        lam = self.lambda_full(x)
        if use_explicit(self, x, return_attn):
            att1, att2 = attention_weights(self, q1 @ k.transpose(-2, -1) / math.sqrt(d),
                                           q2 @ k.transpose(-2, -1) / math.sqrt(d))
            att = att1 - lam * att2  # each row sums to 1 − λ_t
            y = att @ v
        else:
            att = None
            y = F.scaled_dot_product_attention(q1, k, v) - lam * F.scaled_dot_product_attention(q2, k, v)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.proj(y), att


# the attention kinds, by ViTConfig.attention
ATTENTIONS = {'classic': Attention, 'diff': DiffAttention, 'diff2': DiffAttentionV2}


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.mlp_dim)
        self.gelu = nn.GELU()
        self.proj = nn.Linear(config.mlp_dim, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.proj(self.gelu(self.fc(x))))


class Block(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = ATTENTIONS[config.attention](config, layer_idx)
        self.dropout = nn.Dropout(config.dropout)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, return_attn=False):
        y, att = self.attn(self.ln_1(x), return_attn)
        x = x + self.dropout(y)
        x = x + self.mlp(self.ln_2(x))
        return x, att


class ViT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        num_patches = (config.image_size // config.patch_size) ** 2
        self.patch_embed = PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.n_embd))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, config.n_embd))
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.head = nn.Linear(config.n_embd, config.num_classes)
        self.apply(self._init_weights)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:  # diff2's λ projection has none
                nn.init.zeros_(module.bias)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def embed(self, x):
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.size(0), -1, -1), x], dim=1) + self.pos_embed
        return self.dropout(x)

    def activations(self, x):
        """Per block, what the DIFF paper's outlier table measures: (the attention logits before the softmax, the
        block's output on the residual stream)."""
        x = self.embed(x)
        for block in self.blocks:
            logits = block.attn.logits(block.ln_1(x))
            x, _ = block(x)
            yield logits, x

    def forward(self, x, return_attn=False):
        x = self.embed(x)
        maps = []
        for block in self.blocks:
            x, att = block(x, return_attn)
            maps.append(att)
        logits = self.head(self.ln_f(x)[:, 0])
        return (logits, maps) if return_attn else logits


def flops_per_image(config):
    """Matmul FLOPs of one training image, forward and backward, on the explicit path, as torch's FlopCounterMode counts
    them (linear layers, patch embedding, QKᵀ and AV; norms and activations left out): a run's training compute is this
    times the images it saw. On a fresh model, with the caller's random state left as it was."""
    with torch.random.fork_rng(devices=[]), FlopCounterMode(display=False) as counter:
        model = ViT(replace(config, attn_impl='explicit'))
        model(torch.randn(1, config.in_channels, config.image_size, config.image_size)).sum().backward()
    return counter.get_total_flops()


def attention_focus(cls_attn, foreground):
    """
    Share of the CLS token's attention mass over patches that lands on foreground patches, per image.
    cls_attn: (B, heads, P) one layer's CLS row without the CLS column; foreground: (B, P) bool.
    Uses |weights| so that signed differential maps are measured on the same scale as softmax maps.
    """
    mass = cls_attn.abs().mean(dim=1)
    return (mass * foreground).sum(dim=1) / mass.sum(dim=1)
