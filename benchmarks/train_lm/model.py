"""The model of ``benchmarks.train_lm``: a small LLaMA-style decoder over byte tokens (RMSNorm, rotary attention,
SwiGLU, an untied ``lm_head``), its seeded initialization, and its loss through ``leanops.linear_cross_entropy`` or
plain logits + ``F.cross_entropy``."""
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

import leanops

from .data import PROGRAM, VOCABULARY

LOSSES = ("linear-ce", "logits")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A LLaMA-style decoder: `layers` blocks of RMSNorm + causal attention with rotary position embeddings
    (`heads` heads) and RMSNorm + SwiGLU MLP (hidden size `mlp_hidden`), over byte tokens, windows of `context`."""
    d_model: int
    layers: int
    heads: int
    mlp_hidden: int
    context: int
    vocabulary: int = VOCABULARY

    def check(self) -> None:
        for name in ("d_model", "layers", "heads", "mlp_hidden", "context", "vocabulary"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{PROGRAM}: model argument '{name}' must be a positive integer, got {value!r}")
        if self.d_model % self.heads or (self.d_model // self.heads) % 2:
            raise ValueError(f"{PROGRAM}: model argument 'd_model' ({self.d_model}) must be 'heads' ({self.heads}) "
                             "times an even head size (rotary embeddings rotate pairs)")


# tiny: the CPU default (~0.1M parameters); small: the issue's ~10M parameters (10.8M), the GPU default.
MODEL_SIZES = {
    "tiny": ModelConfig(d_model=64, layers=2, heads=4, mlp_hidden=176, context=64),
    "small": ModelConfig(d_model=384, layers=6, heads=6, mlp_hidden=1024, context=256),
}


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, the statistics in float32 whatever x's dtype (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


def rotary_tables(length: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (length, head_dim / 2), float32, of RoPE's angles position * 10000^(-2i / head_dim) (Su et al.
    2021). Made at every forward rather than kept as buffers: ``model.to(bfloat16)`` would round buffers."""
    inverse_frequency = 10000.0 ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.arange(length, device=device, dtype=torch.float32)[:, None] * inverse_frequency
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the (first half, second half) pairs of x's last dimension (LLaMA's rotate-half layout), in float32."""
    first, second = x.float().chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1).to(x.dtype)


class Attention(nn.Module):
    """Multi-head causal self-attention with rotary embeddings, through F.scaled_dot_product_attention."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.heads = config.heads
        self.q_proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.k_proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.v_proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.o_proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        shape = (batch, length, self.heads, width // self.heads)
        q, k, v = (projection(x).view(shape).transpose(1, 2) for projection in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(batch, length, width))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) (Shazeer 2020)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(config.mlp_hidden, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """x + attention(norm(x)), then + mlp(norm(x)) (pre-norm)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.d_model)
        self.attention = Attention(config)
        self.mlp_norm = RMSNorm(config.d_model)
        self.mlp = SwiGLU(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class LlamaModel(nn.Module):
    """Token embedding, `layers` blocks, a final RMSNorm and an untied output head ``lm_head`` (so that
    ``frugal_param_groups`` keeps the head, like the embedding and the norms, fully AdamW)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.check()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocabulary, config.d_model)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.norm = RMSNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocabulary, bias=False)

    def initialize(self, generator: torch.Generator) -> None:
        """Normal(0, 0.02) weights, the residual outputs (o_proj, down_proj) scaled by 1/sqrt(2 layers) (GPT-2),
        norms at 1; drawn from `generator` in module order, so a seed gives every method the same start."""
        residual_std = 0.02 / math.sqrt(2 * self.config.layers)
        with torch.no_grad():
            for name, parameter in self.named_parameters():
                if name.endswith("norm.weight"):
                    parameter.fill_(1.0)
                    continue
                std = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(batch, length) int64 tokens -> (batch, length, d_model) final hidden states (after the final norm)."""
        x = self.embed_tokens(tokens)
        cos, sin = rotary_tables(tokens.shape[1], self.config.d_model // self.config.heads, tokens.device)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)


def build_model(config: ModelConfig, seed: int, device: torch.device, dtype: torch.dtype) -> LlamaModel:
    """The model initialized from `seed` in float32 on the CPU, then moved to `device` and `dtype` (a bf16 model
    starts from the rounded float32 initialization, so every method of a seed starts from the same weights)."""
    model = LlamaModel(config)
    model.initialize(torch.Generator().manual_seed(1_000_003 + seed))
    return model.to(device=device, dtype=dtype)


def language_model_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                        loss: str = "linear-ce", backend: str = "auto", compute_dtype: torch.dtype | None = None,
                        reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of hidden @ weight^T against targets: ``leanops.linear_cross_entropy`` (loss="linear-ce",
    never building the logits) or plain PyTorch (loss="logits": the logits, then F.cross_entropy in float32).
    `compute_dtype` casts hidden and weight first (mixed precision: bfloat16 as autocast would)."""
    if loss not in LOSSES:
        raise ValueError(f"{PROGRAM}: argument 'loss' must be one of {LOSSES}, got {loss!r}")
    if compute_dtype is not None:
        hidden, weight = hidden.to(compute_dtype), weight.to(compute_dtype)
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if loss == "linear-ce":
        return leanops.linear_cross_entropy(hidden, weight, targets, reduction=reduction, backend=backend)
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction=reduction)
