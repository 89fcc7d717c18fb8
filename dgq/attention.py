"""The attention processor through which DGQ observes and quantizes q, k, v and the probabilities.

Installed with ``Attention.set_processor`` (a sanctioned seam: no UNet code is forked). It computes
what diffusers' ``AttnProcessor`` computes, with four hooks: ``q``, ``k``, ``v`` (``(B*heads, N, d)``
tensors) and ``probs`` (softmax output ``(B*heads, N, M)``, computed in float32). A hook is
``fn(tensor, slot) -> tensor``: an observer during calibration, a fake quantizer in simulation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers.models.attention_processor import Attention

Hook = Callable[[torch.Tensor, int], torch.Tensor]


class StepContext:
    """The timestep slot of the UNet call in progress, set by a UNet forward pre-hook."""

    def __init__(self) -> None:
        self.slot: int | None = None

    def current(self) -> int:
        if self.slot is None:
            raise RuntimeError("no timestep slot is set: the UNet pre-hook did not run")
        return self.slot


class DGQAttnProcessor:
    """diffusers ``AttnProcessor`` semantics with quantization hooks on q, k, v and probabilities.

    ``probs`` hooks also receive ``batch_size`` so a per-prompt scale can be taken per batch item.
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

        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)
        bos = is_cross and self.keep_bos
        if self.q is not None:
            query = self.q(query, slot)
        if self.k is not None:
            key = torch.cat([key[:, :1], self.k(key[:, 1:], slot)], 1) if bos else self.k(key, slot)
        if self.v is not None:
            value = self.v(value, slot)

        scores = torch.baddbmm(
            torch.empty(query.shape[0], query.shape[1], key.shape[1], dtype=torch.float32, device=query.device),
            query.float(),
            key.float().transpose(-1, -2),
            beta=0,
            alpha=attn.scale,
        )
        if attention_mask is not None:
            scores = scores + attention_mask.float()
        probs = scores.softmax(dim=-1)
        if self.probs is not None:
            if bos:
                probs = torch.cat([probs[..., :1], self.probs(probs[..., 1:], slot, batch_size)], -1)
            else:
                probs = self.probs(probs, slot, batch_size)
        hidden_states = torch.bmm(probs.to(value.dtype), value)
        hidden_states = attn.batch_to_head_dim(hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
