"""The hybrid student: a Llama whose configured layers use an RWKV-style time-mix instead of attention.

Self-contained on purpose (imports only torch and transformers): ``save_pretrained`` copies this
file next to the weights (``auto_map``), so a saved student loads anywhere with
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``; inside modelmake the
classes are also registered with the Auto classes (``register()``).

The time-mix of layer ``i`` (RWKV-6 style, one state matrix per head)::

    x'_t  = x_t + mu * (x_{t-1} - x_t)                      token shift, mu = 0 at init
    r, k, v = W_r x'_t, W_k x'_t / sqrt(d), W_v x'_t         W_r <- q_proj, W_k <- k_proj, W_v <- v_proj
    y_t   = r_t (S_{t-1} + diag(u) k_t^T v_t)                 "bonus" u for the current token
    S_t   = diag(w) S_{t-1} + k_t^T v_t                       per-channel decay w = exp(-exp(d))
    out   = W_o GroupNorm(y)                                  W_o <- o_proj

Grouped-query attention: k_proj / v_proj have ``num_key_value_heads`` heads; query head ``h`` reads
kv head ``h // (num_heads / num_kv_heads)`` (transformers' ``repeat_kv``), so each kv head's rows
are repeated that many times, in that order. Padding (attention mask 0) never enters the state.
The recurrence is plain PyTorch (runs on CPU); flash-linear-attention's ``chunk_rwkv6`` is used
as a fast path only when it imports, the tensors are on a GPU and ``use_fla`` is set.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

try:  # optional fast path; its Triton kernels need a GPU
    from fla.ops.rwkv6 import chunk_rwkv6  # type: ignore
except Exception:  # noqa: BLE001 - any import failure means: no fast path
    chunk_rwkv6 = None


class HybridConfig(LlamaConfig):
    model_type = "rwkv_hybrid"

    def __init__(self, rwkv_layers: list[int] | None = None, use_fla: bool = False, **kwargs):
        self.rwkv_layers = list(rwkv_layers or [])
        self.use_fla = use_fla
        super().__init__(**kwargs)


def expand_kv(weight: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """[num_kv_heads * d, ...] -> [num_heads * d, ...]: kv head j serves query heads j*rep .. j*rep+rep-1."""
    rep = num_heads // num_kv_heads
    shaped = weight.reshape(num_kv_heads, head_dim, *weight.shape[1:])
    return shaped.repeat_interleave(rep, dim=0).reshape(num_heads * head_dim, *weight.shape[1:])


def recurrence(r, k, v, w, u, state=None):
    """Pure-PyTorch RWKV-6 recurrence. r, k, v, w: [B, H, T, D] (w: decay in (0, 1)); u: [H, D].

    Returns y [B, H, T, D] and the final state [B, H, D, D]."""
    b, h, t, d = r.shape
    s = torch.zeros(b, h, d, d, dtype=r.dtype, device=r.device) if state is None else state
    ys = []
    for i in range(t):
        kv = k[:, :, i, :, None] * v[:, :, i, None, :]  # [B, H, D, D]
        ys.append(torch.einsum("bhd,bhde->bhe", r[:, :, i], s + u[None, :, :, None] * kv))
        s = w[:, :, i, :, None] * s + kv
    return torch.stack(ys, dim=2), s


def fla_rwkv6(r, k, v, logw, u):
    """:func:`recurrence` through flash-linear-attention's ``chunk_rwkv6`` (Triton; GPU only).

    Takes and returns this module's layout, r, k, v: [B, H, T, D], ``logw``: the log decay [H, D],
    ``u``: the bonus [H, D], and gives fla its own (fla 0.6): r, k, v and the log decay per step as
    [B, T, H, D], u as [H, D], scale 1 (the keys are already scaled); its output [B, T, H, D] comes
    back as [B, H, T, D].
    """
    b, _, t, _ = r.shape
    r, k, v = (x.transpose(1, 2).contiguous() for x in (r, k, v))
    w = logw[None, None].expand(b, t, -1, -1).to(r.dtype).contiguous()
    y, _ = chunk_rwkv6(r, k, v, w, u.to(r.dtype), scale=1.0)
    return y.transpose(1, 2)


class TimeMix(nn.Module):
    """RWKV-style recurrent replacement for one layer's self-attention (same call signature)."""

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        inner = self.num_heads * self.head_dim
        hs = config.hidden_size
        bias = bool(getattr(config, "attention_bias", False))
        self.receptance = nn.Linear(hs, inner, bias=bias)
        self.key = nn.Linear(hs, inner, bias=bias)
        self.value = nn.Linear(hs, inner, bias=bias)
        self.output = nn.Linear(inner, hs, bias=bias)
        self.mu = nn.Parameter(torch.zeros(3, hs))  # token shift for r, k, v
        # decays spread from fast to slow across channels (RWKV's init), bonus u = 0.5
        ratio = torch.arange(self.head_dim, dtype=torch.float32) / max(1, self.head_dim - 1)
        decay = -6.0 + 5.0 * ratio ** 0.7  # w = exp(-exp(decay)) in ~(0.08, 0.998)
        self.decay = nn.Parameter(decay.repeat(self.num_heads, 1))  # [H, D]
        self.bonus = nn.Parameter(torch.full((self.num_heads, self.head_dim), 0.5))
        self.ln_x = nn.GroupNorm(self.num_heads, inner, eps=1e-5 * self.head_dim)
        self.use_fla = bool(getattr(config, "use_fla", False))

    @torch.no_grad()
    def init_from_attention(self, attn: nn.Module, num_kv_heads: int) -> None:
        """q -> receptance, k -> key, v -> value (kv heads expanded for GQA), o -> output."""
        n, d = self.num_heads, self.head_dim
        self.receptance.weight.copy_(attn.q_proj.weight)
        self.key.weight.copy_(expand_kv(attn.k_proj.weight, n, num_kv_heads, d))
        self.value.weight.copy_(expand_kv(attn.v_proj.weight, n, num_kv_heads, d))
        self.output.weight.copy_(attn.o_proj.weight)
        for mine, theirs, expand in ((self.receptance, attn.q_proj, False), (self.key, attn.k_proj, True),
                                     (self.value, attn.v_proj, True), (self.output, attn.o_proj, False)):
            if mine.bias is not None and theirs.bias is not None:
                mine.bias.copy_(expand_kv(theirs.bias, n, num_kv_heads, d) if expand else theirs.bias)

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, position_embeddings=None,
                past_key_values=None, rwkv_pad_mask=None, **kwargs):
        """``rwkv_pad_mask``: the [B, T] padding mask, passed down by the model as a layer argument (not
        kept on the module: gradient checkpointing recomputes the layer in the backward pass with the
        arguments of the forward, after the model's forward returned)."""
        b, t, _ = hidden_states.shape
        x = hidden_states
        mask = rwkv_pad_mask if rwkv_pad_mask is not None and rwkv_pad_mask.shape == (b, t) else None
        prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
        if mask is not None:  # a pad before a token shifts in zeros, as at the start of a sequence
            prev = prev * torch.cat([torch.zeros_like(mask[:, :1]), mask[:, :-1]], dim=1)[..., None].to(x.dtype)
        xr, xk, xv = (x + self.mu[i] * (prev - x) for i in range(3))

        def heads(y):
            return y.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

        r = heads(self.receptance(xr))
        k = heads(self.key(xk)) / math.sqrt(self.head_dim)
        v = heads(self.value(xv))
        if mask is not None:
            k = k * mask[:, None, :, None].to(k.dtype)  # padding never enters the state
        logw = -torch.exp(self.decay.float())  # log of the decay, [H, D]
        if self.use_fla and chunk_rwkv6 is not None and r.is_cuda:
            y = fla_rwkv6(r, k, v, logw, self.bonus)
        else:
            w = torch.exp(logw)[None, :, None, :].expand(b, -1, t, -1).to(r.dtype)
            y, _ = recurrence(r, k, v, w, self.bonus.to(r.dtype))
        y = y.transpose(1, 2).reshape(b * t, -1)
        y = self.ln_x(y).view(b, t, -1)
        return self.output(y), None


class HybridForCausalLM(LlamaForCausalLM):
    """A Llama whose ``config.rwkv_layers`` use :class:`TimeMix` instead of self-attention."""

    config_class = HybridConfig

    def __init__(self, config: HybridConfig):
        super().__init__(config)
        for i in config.rwkv_layers:
            self.model.layers[i].self_attn = TimeMix(config, i)
        self.post_init()

    def time_mixes(self) -> list[TimeMix]:
        return [self.model.layers[i].self_attn for i in self.config.rwkv_layers]

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, use_cache=None, **kwargs):
        # the recurrent layers keep no KV cache: every forward sees the whole sequence; the padding mask
        # reaches every layer as an argument (the attention layers ignore it)
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, past_key_values=None,
                               use_cache=False, rwkv_pad_mask=attention_mask, **kwargs)


def register() -> None:
    """Register the classes with the Auto classes (and for saving their code with the weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register("rwkv_hybrid", HybridConfig)
        AutoModelForCausalLM.register(HybridConfig, HybridForCausalLM)
    except ValueError:
        pass  # already registered


def from_teacher(teacher: LlamaForCausalLM, rwkv_layers: list[int], use_fla: bool = False) -> HybridForCausalLM:
    """A hybrid copy of a Llama teacher: same weights; ``rwkv_layers`` re-initialised from attention."""
    n = teacher.config.num_hidden_layers
    bad = [i for i in rwkv_layers if not 0 <= i < n]
    if bad:
        raise ValueError(f"rwkv_layers {bad} out of range: the teacher has {n} layers (0..{n - 1})")
    cfg = HybridConfig(rwkv_layers=rwkv_layers, use_fla=use_fla, **teacher.config.to_dict())
    cfg.architectures = ["HybridForCausalLM"]
    student = HybridForCausalLM(cfg)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected or all(".self_attn." in u for u in unexpected), unexpected
    for i in rwkv_layers:
        student.model.layers[i].self_attn.init_from_attention(
            teacher.model.layers[i].self_attn, teacher.config.num_key_value_heads)
    student.tie_weights()
    return student


HybridConfig.register_for_auto_class()
HybridForCausalLM.register_for_auto_class("AutoModelForCausalLM")
