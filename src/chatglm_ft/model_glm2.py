"""ChatGLM2-6B / ChatGLM3-6B in plain PyTorch (SPEC.md II.3), with the original parameter names.

A sibling of model.py (DESIGN.md "a second architecture"): RMSNorm, SwiGLU, grouped key/value heads,
one position per token with interleaved-pair rotary on half of each head, an untied output layer.
It offers the interface model.py's ChatGLMForConditionalGeneration offers to generation, training,
quantization and adapters (forward, setup_caches, loss_from_hidden, ...), so those work unchanged.

Batch-first throughout: hidden states are (B, T, H), attention tensors (B, heads, T, d). What differs
from ChatGLM-6B in positions and masks lives in three functions (`padding_start`, `positions_1d`,
`causal_padding_mask`) and `PaddingLayout`, this architecture's answer to `steps.Layout`
(docs/architecture.md): every decode path (eager, fast, the server engine) and evaluation run it
through steps.py. All matmuls go through `ops.linear`, attention through `ops.attend` (grouped
key/value heads), the interleaved-pair rotary through `ops.rotary_pairs`, the norms through
`ops.rms_norm` and SwiGLU through `ops.swiglu`: the seams where fused/quantized kernels plug in.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import ops
from .config_glm2 import ChatGLM2Config
from .model import CausalLMHead, CausalLMOutput, KVCache
from .ops import DEFAULT_KERNELS
from .options import DecodeOptions, KernelOptions
from .positions import per_column, per_query
from .ptuning import prefix_inputs, with_prefix


# -- positions and masks (what differs from ChatGLM-6B's prefix LM) -----------------------------
@dataclass
class PaddingLayout:
    """Where each left-padded row starts: its first real column (SPEC.md II.3.6). ChatGLM2/3's answer to
    `steps.Layout`: 1-D positions counted from `start`, a causal mask that hides the left padding."""

    start: torch.Tensor  # (B,) long, or (B, T) per column: each packed sequence's first column (packing.py)

    # A server slot's prompt starts at column 0: the slot needs no state beyond its column.
    STATE_SIZE = 0
    IDLE_STATE = ()

    def positions(self, columns: torch.Tensor) -> torch.Tensor:
        return positions_1d(self.start, columns)

    def mask_for(self, query_columns: torch.Tensor, key_length: int, *, explicit: bool = False) -> torch.Tensor | None:
        """None (plain causal, so SDPA keeps its flash kernels) for unpadded prompts run from column 0;
        the bool (B, 1, T, S) mask otherwise. Decoding (one query column) and `explicit` (a captured
        prefill: no host check of the padding) always get the tensor: a captured step needs the same
        kind of input every time."""
        T = query_columns.shape[-1]
        if (not explicit and query_columns.dim() == 1 and T > 1 and T == key_length
                and not bool((self.start > 0).any())):
            return None
        return causal_padding_mask(self.start, query_columns, key_length)

    def slot_state(self) -> torch.Tensor:
        return self.start.new_zeros(self.start.shape[0], self.STATE_SIZE)

    @classmethod
    def of_slots(cls, state: torch.Tensor) -> "PaddingLayout":
        return cls(start=torch.zeros(state.shape[0], dtype=torch.long, device=state.device))


def padding_start(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """First non-pad column of each row of a left-padded (B, T) batch (T - 1 for an all-pad row)."""
    T = input_ids.shape[1]
    cols = torch.arange(T, device=input_ids.device).expand_as(input_ids)
    first = torch.where(input_ids != pad_token_id, cols, torch.full_like(cols, T)).min(dim=1).values
    return first.clamp(max=T - 1)


def positions_1d(start: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Position ids (B, T) of absolute `columns` (T,) or (B, T): 0 at each row's first real token, 0 on pads."""
    if columns.dim() == 1:
        columns = columns[None, :].expand(start.shape[0], -1)
    return (columns - per_column(start)).clamp(min=0)


def causal_padding_mask(start: torch.Tensor, query_columns: torch.Tensor, key_length: int) -> torch.Tensor:
    """Bool mask (B, 1, T, S), True where query column i may attend key column j: j is not padding and j <= i.

    A pad query sees itself (the reference unmasks pad rows entirely; either way their outputs never
    reach real rows, and no softmax row is empty)."""
    if query_columns.dim() == 1:
        query_columns = query_columns[None, :].expand(start.shape[0], -1)
    i = query_columns[:, None, :, None]  # (B, 1, T, 1)
    j = torch.arange(key_length, device=query_columns.device)[None, None, None, :]  # (1, 1, 1, S)
    return ((j >= per_query(start)) & (j <= i)) | (j == i)


def padding_mask_from_2d(attention_mask: torch.Tensor, query_columns: torch.Tensor) -> torch.Tensor:
    """The bool mask of a tokenizer's 2D attention_mask (B, S) (1 = token, 0 = left pad) for queries at
    `query_columns` (T,): causal AND key-is-not-pad, as the reference builds it."""
    keys = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, S)
    j = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    causal = j[None, :] <= query_columns[:, None]  # (T, S)
    return (causal[None, None] & keys) | (j[None, :] == query_columns[:, None])[None, None]


# -- rotary (SPEC.md II.3.5) ---------------------------------------------------------------------
def rotary_inv_freq(rotary_dim: int, device: Any = None) -> torch.Tensor:
    """1/10000^(2k/r), k = 0..r/2-1: the original's `rotary_pos_emb.inv_freq` buffer (float32 here)."""
    return 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim))


def rotary_tables(position_ids: torch.Tensor, rotary_dim: int, dtype: torch.dtype, family: str
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (B, T, 1, r/2) for 1-D positions (B, T), rounded as the original rounds them in `dtype`.

    The original builds a seq_length-row table on every forward and indexes it; computing only the
    rows used gives the same values. ChatGLM2 computes θ, the positions and their product in the
    model dtype (16-bit rounding of positions and angles); ChatGLM3 in float32. Both then take
    cos/sin in float32 and round the table to the model dtype."""
    half_precision = dtype in (torch.float16, torch.bfloat16)
    if family == "chatglm2" and half_precision:
        k = torch.arange(0, rotary_dim, 2, dtype=dtype, device=position_ids.device)
        theta = 1.0 / (10000 ** (k / rotary_dim))
        angles = (position_ids.to(dtype)[..., None] * theta).float()
    else:
        theta = rotary_inv_freq(rotary_dim, position_ids.device)
        angles = position_ids.float()[..., None] * theta  # (B, T, r/2)
    cos, sin = angles.cos(), angles.sin()
    if half_precision:
        cos, sin = cos.to(dtype), sin.to(dtype)
    return cos[:, :, None, :], sin[:, :, None, :]


# -- attention over grouped key/value heads --------------------------------------------------------
def attend_grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   options: KernelOptions = DEFAULT_KERNELS) -> torch.Tensor:
    """Softmax attention of q (B, N, T, d) over k, v (B, G, S, d), query head n using group n // (N/G);
    `mask` (B, 1, T, S) True = visible, or None: causal with the queries as the last T of the S keys
    (a prompt, or one new token seeing the whole cache). Returns (B, N, T, d)."""
    T, S = q.shape[2], k.shape[2]
    if mask is None and 1 < T < S:  # SDPA's causal flag aligns to the top left: spell the mask out
        j = torch.arange(S, device=q.device)
        mask = (j[None, :] <= j[S - T:, None])[None, None]  # (1, 1, T, S)
    return ops.attend(q, k, v, mask, options, causal=mask is None and T > 1)


# -- the network ---------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """y = weight * x / sqrt(mean(x^2) + eps), the statistics in float32 (SPEC.md II.3.2)."""

    def __init__(self, size: int, eps: float, device: Any = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, device=device))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * normed).to(x.dtype)  # the product in float32, as the original


class SelfAttention(nn.Module):
    def __init__(self, config: ChatGLM2Config, device: Any = None):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.kv_heads = config.kv_heads
        self.head_dim = config.head_dim
        projection = self.num_heads * self.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, projection + 2 * self.kv_heads * self.head_dim,
                                         bias=config.add_qkv_bias, device=device)
        self.dense = nn.Linear(projection, config.hidden_size, bias=False, device=device)
        self.kernels = DEFAULT_KERNELS  # ops.use_kernels sets the model's choice

    def split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, N·d + 2·G·d) -> q (B, T, N, d), k and v (B, T, G, d): all queries, then keys, then values."""
        N, G, d = self.num_heads, self.kv_heads, self.head_dim
        q, k, v = qkv.split([N * d, G * d, G * d], dim=-1)
        return q.unflatten(-1, (N, d)), k.unflatten(-1, (G, d)), v.unflatten(-1, (G, d))

    def forward(self, x, cos, sin, attn_mask, kv_cache: KVCache | None = None, cache_columns=None, kv_length=None,
                cache_rows=None, prefix_kv=None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.split_qkv(ops.linear(self.query_key_value, x, self.kernels))
        q, k = ops.rotary_pairs(q, k, cos, sin, self.kernels)  # k cached after rotary, as the original
        if kv_cache is not None:
            k_all, v_all = kv_cache.update(cache_columns, k, v, cache_rows, kv_length)  # (B, G, S, d)
            if kv_length is not None:
                k_all, v_all = k_all[:, :, :kv_length], v_all[:, :, :kv_length]
        else:  # P-Tuning without a cache: the prefix keys/values (G groups, not rotated) come first
            k_all, v_all = with_prefix(k.transpose(1, 2), v.transpose(1, 2), prefix_kv)
        y = attend_grouped(q.transpose(1, 2), k_all, v_all, attn_mask, self.kernels)  # (B, N, T, d)
        return ops.linear(self.dense, y.transpose(1, 2).reshape(B, T, -1), self.kernels)


class MLP(nn.Module):
    """SwiGLU: the first F outputs of dense_h_to_4h are the gate, the last F the up projection."""

    def __init__(self, config: ChatGLM2Config, device: Any = None):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=False, device=device)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=False, device=device)
        self.kernels = DEFAULT_KERNELS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = ops.linear(self.dense_h_to_4h, x, self.kernels)  # (B, T, 2F): [gate | up]
        return ops.linear(self.dense_4h_to_h, ops.swiglu(u, self.kernels), self.kernels)


class GLMBlock(nn.Module):
    def __init__(self, config: ChatGLM2Config, device: Any = None):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon, device)
        self.self_attention = SelfAttention(config, device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon, device)
        self.mlp = MLP(config, device)
        self.kernels = DEFAULT_KERNELS

    def forward(self, h, cos, sin, attn_mask, kv_cache=None, cache_columns=None, kv_length=None, cache_rows=None,
                prefix_kv=None):
        a = self.self_attention(ops.rms_norm(self.input_layernorm, h, options=self.kernels), cos, sin, attn_mask,
                                kv_cache, cache_columns, kv_length, cache_rows, prefix_kv)
        h, x = ops.rms_norm(self.post_attention_layernorm, h, residual=a, options=self.kernels)  # h += a; norm(h)
        return h + self.mlp(x)


class Embedding(nn.Module):
    def __init__(self, config: ChatGLM2Config, device: Any = None):
        super().__init__()
        # An explicit weight skips normal_() init, which on `meta` would import torch._dynamo (seconds).
        weight = torch.empty(config.padded_vocab_size, config.hidden_size, device=device)
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size, _weight=weight)
        if weight.device.type != "meta":
            nn.init.normal_(self.word_embeddings.weight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids)


class RotaryEmbedding(nn.Module):
    """Holds the original's `inv_freq` buffer (so checkpoints keep their key); the tables are built
    from the positions and the activation dtype by `rotary_tables`."""

    def __init__(self, config: ChatGLM2Config, device: Any = None):
        super().__init__()
        self.register_buffer("inv_freq", rotary_inv_freq(config.rotary_dim, device=device))


class Encoder(nn.Module):
    def __init__(self, config: ChatGLM2Config, device: Any = None):
        super().__init__()
        self.layers = nn.ModuleList(GLMBlock(config, device) for _ in range(config.num_layers))
        self.final_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon, device)


class ChatGLM2Model(nn.Module):
    """`transformer.*`: embedding, rotary_pos_emb, encoder (layers, final_layernorm), output_layer."""

    def __init__(self, config: ChatGLM2Config, device: Any = None):
        super().__init__()
        self.config = config
        self.embedding = Embedding(config, device)
        self.rotary_pos_emb = RotaryEmbedding(config, device)
        self.encoder = Encoder(config, device)
        self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False, device=device)
        self.gradient_checkpointing = False
        self.prefix_encoder = None  # P-Tuning v2: a ptuning.PrefixEncoder, attached by ptuning.attach
        self.kernels = DEFAULT_KERNELS

    @property
    def layers(self) -> nn.ModuleList:
        """The blocks (training compiles and shards them one by one, as for ChatGLM-6B)."""
        return self.encoder.layers

    @property
    def final_layernorm(self) -> RMSNorm:
        return self.encoder.final_layernorm

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.embedding.word_embeddings

    def forward(self, input_ids, position_ids, attn_mask, kv_caches=None, cache_columns=None, kv_length=None,
                cache_rows=None) -> torch.Tensor:
        """Final-normed hidden states (B, T, H); position_ids (B, T); attn_mask (B, 1, T, S) bool or None (causal)."""
        h = self.embedding(input_ids)
        cos, sin = rotary_tables(position_ids, self.config.rotary_dim, h.dtype, self.config.family)
        # P-Tuning v2 (ptuning.py): P keys/values in front of every sequence; positions unchanged (SPEC.md II.7.3)
        attn_mask, cache_columns, kv_length, prefix_kvs = prefix_inputs(
            self.prefix_encoder, attn_mask, kv_caches, cache_columns, kv_length, input_ids.shape[0], h.dtype)
        prefix_kvs = prefix_kvs or [None] * len(self.encoder.layers)
        for i, layer in enumerate(self.encoder.layers):
            cache = kv_caches[i] if kv_caches is not None else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, attn_mask, prefix_kv=prefix_kvs[i],
                                                      use_reentrant=False)
            else:
                h = layer(h, cos, sin, attn_mask, cache, cache_columns, kv_length, cache_rows, prefix_kvs[i])
        return ops.rms_norm(self.encoder.final_layernorm, h, options=self.kernels)


class ChatGLM2ForConditionalGeneration(CausalLMHead, nn.Module):
    """The full ChatGLM2/3 model with the original's parameter paths; `device="meta"` builds it without memory."""

    def __init__(self, config: ChatGLM2Config, device: Any = None):
        super().__init__()
        self.config = config
        self.transformer = ChatGLM2Model(config, device)
        self.kv_caches: nn.ModuleList | None = None
        self.kernels = DEFAULT_KERNELS
        self.decode_options = DecodeOptions()  # how generation decodes this model by default (fast.fast_options)

    # -- properties ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.transformer.embedding.word_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.encoder.final_layernorm.weight.dtype

    @property
    def lm_head(self) -> nn.Module:
        """The output projection (`transformer.output_layer`), under the name the shared code uses."""
        return self.transformer.output_layer

    lm_head_tied = False  # ChatGLM2/3 never share embeddings and output layer

    def reset_buffers(self) -> None:
        """Recompute the non-learned buffer after building on `meta` (the checkpoint's copy is not read)."""
        self.transformer.rotary_pos_emb.inv_freq = rotary_inv_freq(self.config.rotary_dim, device=self.device).to(
            self.dtype)

    # -- layouts: what steps.py asks of an architecture (docs/architecture.md) -------------------
    def prompt_layout(self, input_ids: torch.Tensor, *, left_padded: bool = True) -> PaddingLayout:
        """Positions and masks of a (B, T) batch of prompts: where each (left-padded) row starts."""
        if not left_padded:
            return PaddingLayout(start=torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device))
        return PaddingLayout(start=padding_start(input_ids, self.config.pad_token_id))

    def slot_layout(self, state: torch.Tensor) -> PaddingLayout:
        """The layout of server cache slots (prompts from column 0) from their (B, 0) state."""
        return PaddingLayout.of_slots(state)

    def idle_slot_state(self) -> tuple[int, ...]:
        return PaddingLayout.IDLE_STATE

    # -- forward ---------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        cache_columns: torch.Tensor | slice | None = None,
        kv_length: int | None = None,
        cache_rows: torch.Tensor | slice | None = None,
        last_logits_only: bool = False,
        logits_at: torch.Tensor | None = None,
        return_logits: bool = True,
        **unused: Any,
    ) -> CausalLMOutput:
        """Logits (B, T, V). Defaults as the original's forward: positions 0..T-1 (the cache columns when
        a cache is used), causal attention.

        `attention_mask` is the (B, 1, T, S) bool mask (True = visible) or a tokenizer's 2D
        0/1 mask (B, S) for left-padded rows; `cache_columns`/`kv_length`/`cache_rows` use the KV
        cache as in model.py. With `labels` the mean shifted cross-entropy (float32) over labels != -100.
        `last_logits_only` / `logits_at` as in model.py (CausalLMHead.output_logits).
        """
        B, T = input_ids.shape
        if position_ids is None:  # unpadded rows: a token's position is its cache column
            columns = cache_columns if isinstance(cache_columns, torch.Tensor) else torch.arange(T, device=input_ids.device)
            position_ids = columns.expand(B, T)
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            attention_mask = self.mask_from_2d(attention_mask, T)
        if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
            attention_mask = None  # a ChatGLM-6B PromptMask: ChatGLM2/3 prompts are plainly causal
        caches = self.kv_caches if cache_columns is not None else None
        h = self.transformer(input_ids, position_ids, attention_mask, caches, cache_columns, kv_length, cache_rows)
        return self.head_outputs(h, labels, return_logits=return_logits, last_logits_only=last_logits_only,
                                 logits_at=logits_at)

    @staticmethod
    def mask_from_2d(attention_mask: torch.Tensor, T: int) -> torch.Tensor | None:
        """The bool mask of the last T queries over a 2D mask's S columns; None (causal) when it has no zeros."""
        if bool(attention_mask.all()):
            return None
        S = attention_mask.shape[1]
        return padding_mask_from_2d(attention_mask, torch.arange(S - T, S, device=attention_mask.device))
