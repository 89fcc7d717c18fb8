"""The attention processor through which DGQ observes and quantizes q, k, v and the probabilities.

Installed with ``Attention.set_processor`` (a sanctioned seam: no UNet code is forked). It computes
what diffusers' ``AttnProcessor`` computes, with four hooks: ``q``, ``k``, ``v`` (``(B*heads, N, d)``
tensors) and ``probs`` (softmax output ``(B*heads, N, M)``, computed in float32). A hook is
``fn(tensor, slot) -> tensor``: an observer during calibration, a fake quantizer in simulation.

The head reshapes, the scores GEMM and the BOS split are methods (``split_heads``, ``merge_heads``,
``scores``, ``bos_split``) so that an exporter can trace them as fewer graph nodes while computing
the same numbers; nothing here reads a tensor's shape where the head count will do.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers.models.attention_processor import Attention

from dgq.quant import as_dtype

Hook = Callable[[torch.Tensor, int], torch.Tensor]


class StepContext:
    """The timestep slot of the UNet call in progress, set by a UNet forward pre-hook."""

    def __init__(self) -> None:
        self.slot: int | None = None

    def current(self) -> int:
        if self.slot is None:
            raise RuntimeError("no timestep slot is set: the UNet pre-hook did not run")
        return self.slot


def scaled_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * q @ k^T`` of float32 ``(B*heads, N, d)`` q and ``(B*heads, M, d)`` k, as diffusers'
    ``get_attention_scores`` computes it (baddbmm)."""
    empty = torch.empty(q.shape[0], q.shape[1], k.shape[1], dtype=torch.float32, device=q.device)
    return torch.baddbmm(empty, q, k.transpose(-1, -2), beta=0, alpha=scale)


class DGQAttnProcessor:
    """diffusers ``AttnProcessor`` semantics with quantization hooks on q, k, v and probabilities.

    ``probs`` hooks also receive the head count so a per-prompt scale can be taken per batch item
    (rows ``b * heads ... (b + 1) * heads - 1`` of the ``(B*heads, N, M)`` probabilities are prompt ``b``).
    In cross-attention with ``keep_bos``, the BOS key row bypasses the ``k`` hook and the BOS
    probability column bypasses the ``probs`` hook (docs/method.md, section 6).
    """

    def __init__(
        self,
        ctx: StepContext,
        q: Hook | None = None,
        k: Hook | None = None,
        v: Hook | None = None,
        probs: Callable[[torch.Tensor, int, int], torch.Tensor] | None = None,
        keep_bos: bool = False,
    ) -> None:
        self.ctx, self.q, self.k, self.v, self.probs, self.keep_bos = ctx, q, k, v, probs, keep_bos

    def split_heads(self, attn: Attention, x: torch.Tensor, width: int) -> torch.Tensor:
        """``(B, N, width) -> (B * heads, N, width // heads)``, diffusers' ``head_to_batch_dim``."""
        return attn.head_to_batch_dim(x)

    def merge_heads(self, attn: Attention, x: torch.Tensor, width: int) -> torch.Tensor:
        """``(B * heads, N, width // heads) -> (B, N, width)``, diffusers' ``batch_to_head_dim``."""
        return attn.batch_to_head_dim(x)

    def scores(self, attn: Attention, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """``scaled_scores`` of q and k in float32."""
        return scaled_scores(as_dtype(q, torch.float32), as_dtype(k, torch.float32), attn.scale)

    def bos_split(self, x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(the BOS token's slice, the rest)`` of ``x`` along its text-token axis ``dim``."""
        return x.narrow(dim, 0, 1), x.narrow(dim, 1, x.shape[dim] - 1)

    def core(
        self,
        attn: Attention,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        slot,
        is_cross: bool,
    ) -> torch.Tensor:
        """Attention of the projected ``(B, N, width)`` query and ``(B, M, width)`` key and value, with
        the hooks, to the merged ``(B, N, width)`` output (before ``to_out``)."""
        query = self.split_heads(attn, query, attn.inner_dim)
        key = self.split_heads(attn, key, attn.inner_kv_dim)
        value = self.split_heads(attn, value, attn.inner_kv_dim)
        bos = is_cross and self.keep_bos
        if self.q is not None:
            query = self.q(query, slot)
        if self.k is not None:
            if bos:
                first, rest = self.bos_split(key, 1)
                key = torch.cat([first, self.k(rest, slot)], 1)
            else:
                key = self.k(key, slot)
        if self.v is not None:
            value = self.v(value, slot)

        scores = self.scores(attn, query, key)
        if attention_mask is not None:
            scores = scores + as_dtype(attention_mask, torch.float32)
        probs = scores.softmax(dim=-1)
        if self.probs is not None:
            if bos:
                first, rest = self.bos_split(probs, probs.ndim - 1)
                probs = torch.cat([first, self.probs(rest, slot, attn.heads)], -1)
            else:
                probs = self.probs(probs, slot, attn.heads)
        if probs.dtype != value.dtype:
            probs = probs.to(value.dtype)
        hidden_states = torch.bmm(probs, value)
        return self.merge_heads(attn, hidden_states, attn.inner_kv_dim)

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        slot = self.ctx.current()
        is_cross = encoder_hidden_states is not None
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch_size, seq_len, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        hidden_states = self.core(attn, query, key, value, attention_mask, slot, is_cross)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        if attn.rescale_output_factor != 1.0:  # x / 1.0 is x: no Div node in a trace
            hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states
