"""ChatGLM-6B in plain PyTorch (SPEC.md sections 2-3), with the original parameter names.

Batch-first throughout: hidden states are (B, T, H), attention tensors (B, nh, T, hd).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .config import RESIDUAL_ALPHA, ChatGLMConfig
from .data import IGNORE_INDEX
from .ops import DEFAULT_KERNELS, PromptMask, apply_rotary  # noqa: F401  (re-exported: model.PromptMask)
from .options import DecodeOptions, KernelOptions
from .positions import PrefixLayout, prefix_layout
from .ptuning import prefix_inputs, refresh_prefix_cache, with_prefix


def rotary_inv_freq(rotary_dim: int, device: torch.device | str | None = None) -> torch.Tensor:
    """inv_freq of the original, rounded to float16 as it stores it (SPEC.md section 2)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim))
    return inv_freq.half().float()


def rotary_tables(position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin (B, T, 1, hd) for 2D positions (B, 2, T): first half of hd from positions,
    second from block positions. rotate_half's minus (on the first quarter of each half) is folded
    into sin, so applying the rotary takes one swap and two arithmetic kernels."""
    angles = position_ids.float()[..., None] * inv_freq  # (B, 2, T, r/2)
    emb = torch.cat([angles, angles], dim=-1)  # (B, 2, T, r)
    emb = torch.cat([emb[:, 0], emb[:, 1]], dim=-1)  # (B, T, hd)
    sin = emb.sin()
    sin.unflatten(-1, (2, 2, -1))[..., 0, :].neg_()  # (B, T, half, quarter, r/2): negate quarters 0 and 2
    return emb.cos().to(dtype)[:, :, None, :], sin.to(dtype)[:, :, None, :]


class KVCache(nn.Module):
    """Preallocated keys/values for one layer, (B, nh, S, hd), written by column."""

    def __init__(self, batch_size: int, num_heads: int, max_length: int, head_dim: int, *, dtype: torch.dtype, device: Any):
        super().__init__()
        shape = (batch_size, num_heads, max_length, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(
        self, columns: torch.Tensor | slice, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor | slice | None = None,
        kv_length: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, T, nh, hd) at `columns` (T,) shared by all rows, or (B, T) per row, or a `slice`
        of columns shared by all rows (a prompt at 0..T-1: a strided copy instead of an index kernel, 6x
        faster at a 2048-token prefill).

        With `rows` the batch is a subset of the cache's slots (continuous batching): a `slice`
        of slots is written and returned as views (no copy: the server's decode step), a (B,)
        tensor of slot indices returns a copy of their first `kv_length` columns.
        """
        if isinstance(columns, slice):
            if rows is not None:
                raise ValueError("a slice of cache columns is for a batch in slot order (no cache_rows)")
            self.k[:, :, columns] = k.transpose(1, 2)
            self.v[:, :, columns] = v.transpose(1, 2)
            return self.k, self.v
        if rows is None and columns.dim() == 1:
            # an index_put (not index_copy_) is what torch.compile writes in place into the cache
            self.k[:, :, columns] = k.transpose(1, 2)
            self.v[:, :, columns] = v.transpose(1, 2)
            return self.k, self.v
        if columns.dim() == 1:
            columns = columns[None, :].expand(k.shape[0], -1)
        if isinstance(rows, torch.Tensor):
            slot = rows
        else:  # written into the cache itself, not through a view: what torch.compile keeps in place
            first = (rows.start or 0) if isinstance(rows, slice) else 0
            slot = torch.arange(first, first + k.shape[0], device=k.device)
        self.k[slot[:, None], :, columns] = k  # advanced index dims (B, T) come first: (B, T, nh, hd)
        self.v[slot[:, None], :, columns] = v
        if rows is None:
            return self.k, self.v
        if isinstance(rows, slice):
            return self.k[rows], self.v[rows]
        return self.k[rows, :, :kv_length], self.v[rows, :, :kv_length]


class SelfAttention(nn.Module):
    def __init__(self, config: ChatGLMConfig, device: Any = None):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size, device=device)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, device=device)
        self.kernels = DEFAULT_KERNELS  # ops.use_kernels sets the model's choice

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | PromptMask | None,
        kv_cache: KVCache | None = None,
        cache_columns: torch.Tensor | None = None,
        kv_length: int | None = None,
        cache_rows: torch.Tensor | slice | None = None,
        prefix_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        B, T, H = x.shape
        qkv = ops.linear(self.query_key_value, x, self.kernels).view(B, T, self.num_heads, 3 * self.head_dim)  # per-head interleaved
        q, k, v = qkv.split(self.head_dim, dim=-1)  # (B, T, nh, hd) each
        q, k = ops.rotary(qkv, q, k, cos, sin, self.kernels)
        if kv_cache is not None:
            k_all, v_all = kv_cache.update(cache_columns, k, v, cache_rows, kv_length)  # (B, nh, S, hd)
            if kv_length is not None:
                k_all, v_all = k_all[:, :, :kv_length], v_all[:, :, :kv_length]
        else:
            # P-Tuning without a cache: the prefix keys/values (not rotated) come first
            k_all, v_all = with_prefix(k.transpose(1, 2), v.transpose(1, 2), prefix_kv)
        y = ops.attend(q.transpose(1, 2), k_all, v_all, attn_mask, self.kernels)  # (B, nh, T, hd)
        return ops.linear(self.dense, y.transpose(1, 2).reshape(B, T, H), self.kernels)


class MLP(nn.Module):
    def __init__(self, config: ChatGLMConfig, device: Any = None):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.inner_hidden_size, device=device)
        self.dense_4h_to_h = nn.Linear(config.inner_hidden_size, config.hidden_size, device=device)
        self.kernels = DEFAULT_KERNELS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(self.dense_4h_to_h, ops.gelu_linear(self.dense_h_to_4h, x, self.kernels), self.kernels)


class GLMBlock(nn.Module):
    def __init__(self, config: ChatGLMConfig, device: Any = None):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon, device=device)
        self.attention = SelfAttention(config, device)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon, device=device)
        self.mlp = MLP(config, device)
        self.kernels = DEFAULT_KERNELS

    def forward(self, h: torch.Tensor, cos, sin, attn_mask, kv_cache=None, cache_columns=None, kv_length=None,
                cache_rows=None, prefix_kv=None) -> torch.Tensor:
        x = self.input_layernorm(h)
        a = self.attention(x, cos, sin, attn_mask, kv_cache, cache_columns, kv_length, cache_rows, prefix_kv)
        y = ops.add_layer_norm(self.post_attention_layernorm, a, x, RESIDUAL_ALPHA, self.kernels)  # LN(x * alpha + a)
        return torch.add(self.mlp(y), y, alpha=RESIDUAL_ALPHA)


class ChatGLMModel(nn.Module):
    def __init__(self, config: ChatGLMConfig, device: Any = None):
        super().__init__()
        self.config = config
        # An explicit weight skips normal_() init, which on `meta` would import torch._dynamo (seconds).
        self.word_embeddings = nn.Embedding(
            config.vocab_size, config.hidden_size, _weight=torch.empty(config.vocab_size, config.hidden_size, device=device)
        )
        if self.word_embeddings.weight.device.type != "meta":
            nn.init.normal_(self.word_embeddings.weight)
        self.layers = nn.ModuleList(GLMBlock(config, device) for _ in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon, device=device)
        self.register_buffer("inv_freq", rotary_inv_freq(config.head_dim // 2, device=device), persistent=False)
        self.gradient_checkpointing = False
        self.prefix_encoder = None  # P-Tuning v2: a ptuning.PrefixEncoder, attached by ptuning.attach

    def forward(self, input_ids, position_ids, attn_mask, kv_caches=None, cache_columns=None, kv_length=None, cache_rows=None):
        h = self.word_embeddings(input_ids)  # (B, T, H)
        cos, sin = rotary_tables(position_ids, self.inv_freq, h.dtype)
        # P-Tuning v2 (ptuning.py): P keys/values in front of every sequence (cached steps: steps.py placed them)
        attn_mask, cache_columns, kv_length, prefix_kvs = prefix_inputs(
            self.prefix_encoder, attn_mask, kv_caches, cache_columns, kv_length, input_ids.shape[0], h.dtype)
        prefix_kvs = prefix_kvs or [None] * len(self.layers)
        for i, layer in enumerate(self.layers):
            cache = kv_caches[i] if kv_caches is not None else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, attn_mask, prefix_kv=prefix_kvs[i],
                                                      use_reentrant=False)
            else:
                h = layer(h, cos, sin, attn_mask, cache, cache_columns, kv_length, cache_rows, prefix_kvs[i])
        return self.final_layernorm(h)


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `h @ weight.T` (float32) against `targets`, in chunks of rows.

    The gradients are computed chunk by chunk during the forward pass and kept (N x H, plus the
    weight's when it trains), so neither the logits nor their gradient is ever stored whole: at
    full size 2k target tokens would otherwise hold over 2 GB of float32 logits for backward.
    """

    CHUNK_ELEMENTS = 2**25  # rows per chunk * vocab: 128 MB of float32 logits (257 rows at full size)

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]  # the caller detaches under no_grad
        rows = max(1, LinearCrossEntropy.CHUNK_ELEMENTS // weight.shape[0])
        x = h.to(weight.dtype)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for start in range(0, x.shape[0], rows):
            xc, tc = x[start:start + rows], targets[start:start + rows]
            logits = (xc @ weight.t()).float()  # (n, V)
            lse = logits.logsumexp(dim=-1)
            total += (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()
            if need_h or need_w:
                dlogits = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                dlogits[torch.arange(tc.shape[0], device=tc.device), tc] -= 1.0
                dlogits = dlogits.to(weight.dtype)
                if need_h:
                    grad_h[start:start + rows] = dlogits @ weight
                if need_w:
                    grad_w += (dlogits.t() @ xc).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        grad_h = grad_h * grad_total.to(grad_h.dtype) if grad_h is not None else None
        grad_w = (grad_w * grad_total).to(ctx.weight_dtype) if grad_w is not None else None
        return grad_h, grad_w, None


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None
    loss: torch.Tensor | None = None


class CausalLMHead:
    """What every ChatGLM generation's *ForConditionalGeneration shares: the loss from hidden states through
    `self.lm_head`, the KV cache, the kernel choice, the chat API and the parameter count (mixed in before
    nn.Module). A model provides `config` (with kv_heads, head_dim), `transformer` (layers, prefix_encoder,
    gradient_checkpointing), `lm_head`, `device` and `dtype`."""

    def use_kernels(self, options: KernelOptions):
        """Choose the inference kernels of every layer (ops.py); the default is KernelOptions()."""
        ops.use_kernels(self, options)
        return self

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.transformer.gradient_checkpointing = enabled

    # -- KV cache --------------------------------------------------------------------------------
    def setup_caches(self, batch_size: int, max_length: int) -> None:
        """Per layer keys/values (B, kv_heads, S, head_dim) for `max_length` sequence columns, plus a P-Tuning
        prefix's columns in front, filled here. An existing cache that fits is kept."""
        c = self.config
        prefix = self.transformer.prefix_encoder
        max_length += prefix.pre_seq_len if prefix is not None else 0
        # each layer's cache lives where the layer does (layers may be spread over devices: multigpu.py)
        devices = [layer.input_layernorm.weight.device for layer in self.transformer.layers]
        first = self.kv_caches[0] if self.kv_caches is not None else None
        if not (first is not None and first.k.shape[0] == batch_size and first.k.shape[2] >= max_length
                and first.k.dtype == self.dtype and first.k.device == devices[0]):
            self.kv_caches = None  # free the old cache before allocating the new one
            self.kv_caches = nn.ModuleList(
                KVCache(batch_size, c.kv_heads, max_length, c.head_dim, dtype=self.dtype, device=device)
                for device in devices
            )
        refresh_prefix_cache(self)  # a new cache, a new prefix or one changed by training steps is written again

    def clear_caches(self) -> None:
        self.kv_caches = None

    def output_logits(self, h: torch.Tensor, *, last_logits_only: bool = False,
                      logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """lm_head logits (B, n, V) of the final hidden states h (B, T, H): of every position, of the last
        (`last_logits_only`) or of the positions `logits_at` ((n,) long: a prompt right-padded to a fixed
        length reads its last real position from a tensor, so one captured prefill serves every length)."""
        if logits_at is not None:
            h = h.index_select(1, logits_at)
        elif last_logits_only:
            h = h[:, -1:]
        return ops.linear(self.lm_head, h, self.kernels)

    def head_outputs(self, h: torch.Tensor, labels: torch.Tensor | None, *, return_logits: bool = True,
                     last_logits_only: bool = False, logits_at: torch.Tensor | None = None) -> CausalLMOutput:
        """The forward's result from the final hidden states: the loss with `labels`, the logits unless
        `return_logits` is False (then only with labels)."""
        loss = self.loss_from_hidden(h, labels) if labels is not None else None
        if loss is not None and not return_logits:
            return CausalLMOutput(logits=None, loss=loss)
        return CausalLMOutput(logits=self.output_logits(h, last_logits_only=last_logits_only, logits_at=logits_at),
                              loss=loss)

    def loss_from_hidden(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Shifted cross-entropy computed only where there is a target: prompt positions cost no lm_head work."""
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        selected = h[:, :-1][keep]  # (N, H)
        if type(self.lm_head) is nn.Linear and selected.shape[0] > 0:
            # Chunked, so the (N, vocab) float32 logits never exist at once (1 GB per 2k targets at full size).
            weight = self.lm_head.weight
            if not torch.is_grad_enabled():  # needs_input_grad ignores no_grad: detach to skip the gradient work
                selected, weight = selected.detach(), weight.detach()
            return LinearCrossEntropy.apply(selected, weight, targets[keep]) / selected.shape[0]
        logits = self.lm_head(selected).float()  # a quantized or adapted lm_head: plain path
        if selected.shape[0] == 0:
            return logits.sum() * 0.0
        return F.cross_entropy(logits, targets[keep])

    # -- chat API familiar from the original -----------------------------------------------------
    def chat(self, tokenizer, query: str, history=None, **kwargs):
        from .chat import chat

        return chat(self, tokenizer, query, history=history, **kwargs)

    def stream_chat(self, tokenizer, query: str, history=None, **kwargs) -> Iterator[tuple[str, list]]:
        from .chat import stream_chat

        return stream_chat(self, tokenizer, query, history=history, **kwargs)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())


class ChatGLMForConditionalGeneration(CausalLMHead, nn.Module):
    """The full model: `transformer.*` + `lm_head`, exactly the original's parameter paths.

    `device="meta"` builds it without allocating (then load weights with `assign`). Passing the
    device here rather than using a `torch.device` context avoids importing torch._dynamo (5 s).
    """

    def __init__(self, config: ChatGLMConfig, device: Any = None):
        super().__init__()
        self.config = config
        self.transformer = ChatGLMModel(config, device)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, device=device)
        self.kv_caches: nn.ModuleList | None = None
        self.kernels = DEFAULT_KERNELS
        self.decode_options = DecodeOptions()  # how generation decodes this model by default (fast.fast_options)

    # -- properties ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.transformer.word_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        # the layer norms are float in every model; quantized embeddings hold integers
        return self.transformer.final_layernorm.weight.dtype

    def tie_lm_head(self) -> None:
        self.lm_head.weight = self.transformer.word_embeddings.weight

    @property
    def lm_head_tied(self) -> bool:
        return self.lm_head.weight is self.transformer.word_embeddings.weight

    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers (after building on `meta` and loading weights)."""
        self.transformer.inv_freq = rotary_inv_freq(self.config.head_dim // 2, device=self.device)

    # -- layouts: what steps.py asks of an architecture (docs/architecture.md) -------------------
    def prompt_layout(self, input_ids: torch.Tensor, *, left_padded: bool = True) -> PrefixLayout:
        """Positions and masks of a (B, T) batch of prompts (GLM's prefix-LM: <sop> and [gMASK] columns)."""
        return prefix_layout(input_ids, self.config, left_padded=left_padded)

    def slot_layout(self, state: torch.Tensor) -> PrefixLayout:
        """The layout of server cache slots from their (B, PrefixLayout.STATE_SIZE) state."""
        return PrefixLayout.of_slots(state)

    def idle_slot_state(self) -> tuple[int, ...]:
        """The slot state of a server slot holding no request (it writes only the scratch column)."""
        return PrefixLayout.IDLE_STATE

    # -- forward ---------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | PromptMask | None = None,
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
        """Logits (B, T, V) for a batch; positions and the prefix mask are derived when not given.

        With `cache_columns` the KV cache (see `setup_caches`) is written at those columns and
        attention runs over its first `kv_length` columns; `cache_rows` (B,) picks the cache slots the
        batch rows use (default: row b is slot b), or a `slice` of slots to use them without a copy. With `labels` the mean shifted
        cross-entropy (in float32) over labels != -100 is returned too. `attention_mask` may be a
        `PromptMask` for one unpadded prompt ending in <sop> (prefill with flash attention). `last_logits_only`
        / `logits_at` ((n,) long positions) compute the logits of the last / those positions only.
        """
        if position_ids is None or attention_mask is None:
            layout = self.prompt_layout(input_ids)
            columns = torch.arange(input_ids.shape[1], device=input_ids.device)
            if position_ids is None:
                position_ids = layout.positions(columns)
            if attention_mask is None:
                attention_mask = layout.mask_for(columns, input_ids.shape[1])
        elif isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            raise ValueError("attention_mask must be the (B, 1, T, S) bool prefix mask, not a 2D padding mask")
        caches = self.kv_caches if cache_columns is not None else None
        h = self.transformer(input_ids, position_ids, attention_mask, caches, cache_columns, kv_length, cache_rows)
        return self.head_outputs(h, labels, return_logits=return_logits, last_logits_only=last_logits_only,
                                 logits_at=logits_at)
