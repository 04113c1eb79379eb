"""One forward of Molmo2's language model over a packed step: many rows' tokens in one sequence.

A step of continuous batching holds up to three kinds of tokens, laid end to end with no padding:

1. the prefixes of newly admitted images (bos + image tokens), each image once for all the
   labels asked of it, with the vision features added to its image tokens as Molmo2 does;
2. one decode token of each running row that steps now;
3. the prompt suffixes of newly admitted rows (the chat text around a label).

Every token first writes its keys and values into the cache slots it belongs to (an image prefix
into the slot of every row that shows it), then reads its slot:

- an image token sees the whole prefix (Molmo2's image tokens attend each other both ways); the
  bos token before the image sees only itself;
- a decode token sees its row up to itself; a suffix token sees the prefix and the suffix up to
  itself (causal).

So one pass through the weights serves prefill and decoding: rows that are decoding ride along
with a prefill for about 1% more tokens instead of waiting for it (vLLM's chunked prefill), and
images of any size share one forward without padding. (Measured on an H100, Molmo2-8B: a padded
forward of one 1280x960 image took 62 ms, of four 189 ms: small forwards are bound by kernel
launches, large ones by the GPU.)

The layer arithmetic is Hugging Face's ``Molmo2DecoderLayer`` (transformers 5.23), on its own
modules and weights (norms, q/k norms, rotary tables, MLP); only the attention, the cache and
the rotary arithmetic are ours (:func:`apply_rotary`, the same four operations, or
:mod:`.fused_rotary`'s one kernel where the engine installed it: an H100 took 0.64 ms a layer for
the four operations at 8,192 tokens, 23 ms of a ~320 ms packed step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from molmo_backend.engine import fused_rotary, prefix_attention, slot_attention, suffix_attention


@dataclass
class StepPlan:
    """What one packed forward computes and where each token's keys go (device tensors)."""

    ids: torch.Tensor  # [T] token ids
    positions: torch.Tensor  # [T] each token's position in its row
    write_src: torch.Tensor  # [W] token whose keys/values are written ...
    write_dst: torch.Tensor  # [W] ... at this flat cache index (slot x stride + position)
    full: slot_attention.Sequences | None  # tokens full_start..: read their slot up to a length
    causal: slot_attention.Dense | None  # the suffix tokens, causal over their slot
    suffix: suffix_attention.SuffixLayout | None  # the same, an image's prefix read once (CUDA)
    bos: torch.Tensor | None  # tokens whose attention output is their own value
    logits_at: torch.Tensor  # [R] tokens whose next-token logits are wanted
    features: torch.Tensor | None = None  # [F, hidden] image features ...
    feature_at: torch.Tensor | None = None  # [F] ... added to these tokens' embeddings
    #: the image prefixes, where they attend among themselves (:mod:`.prefix_attention`); then
    #: ``full`` holds only the decode tokens, from token ``full_start``
    prefixes: prefix_attention.Prefixes | None = None
    full_start: int = 0


@dataclass
class PlanBuilder:
    """Lays out one step on the host: image prefixes first, then decode tokens (together the
    tokens that read a whole slot prefix), then prompt suffixes. :meth:`build` makes the
    :class:`StepPlan`; decode tokens' ids come from the decoder's device state."""

    stride: int  # slot s starts at s x stride in the flat pool (its first block)
    image_token_id: int
    ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    write_src: list[int] = field(default_factory=list)
    write_dst: list[int] = field(default_factory=list)
    #: (start, count, slot, keys read, the first token's last visible key)
    full: list[tuple[int, int, int, int, int]] = field(default_factory=list)
    causal: list[tuple[int, int, int, int]] = field(default_factory=list)  # (start, count, slot, first pos)
    prefix_slot: list[int] = field(default_factory=list)  # each suffix's prefix is read in this slot
    bos: list[int] = field(default_factory=list)
    feature_at: list[int] = field(default_factory=list)
    decode_at: list[int] = field(default_factory=list)
    decode_slots: list[int] = field(default_factory=list)
    logits_at: list[int] = field(default_factory=list)

    def _add(self, ids: Sequence[int], first_position: int, slots: Sequence[int]) -> int:
        start = len(self.ids)
        self.ids.extend(ids)
        self.positions.extend(range(first_position, first_position + len(ids)))
        for slot in slots:
            base = slot * self.stride + first_position
            self.write_src.extend(range(start, start + len(ids)))
            self.write_dst.extend(range(base, base + len(ids)))
        return start

    def add_prefix(self, ids: Sequence[int], slots: Sequence[int]) -> None:
        """An image prefix (bos first) written into every slot of ``slots``."""
        assert not self.decode_at and not self.causal, "prefixes come first"
        start = self._add(ids, 0, slots)
        self.full.append((start, len(ids), slots[0], len(ids), 0))  # bos sees only itself
        self.bos.append(start)
        self.feature_at.extend(start + i for i, token in enumerate(ids) if token == self.image_token_id)

    def add_decode(self, slot: int, length: int) -> int:
        """The next token of a row holding ``length`` tokens; returns its logits' index."""
        assert not self.causal, "decode tokens come before suffixes"
        start = self._add([0], length, [slot])
        self.full.append((start, 1, slot, length + 1, length))
        self.decode_at.append(start)
        self.decode_slots.append(slot)
        self.logits_at.append(start)
        return len(self.logits_at) - 1

    def add_suffix(
        self, ids: Sequence[int], slot: int, first_position: int, prefix_slot: int | None = None
    ) -> int:
        """A prompt suffix behind its prefix in ``slot``; returns its last token's logits' index.
        ``prefix_slot``: a slot holding the same prefix (the image's first row's), where the
        rows of one image read it together."""
        start = self._add(ids, first_position, [slot])
        self.causal.append((start, len(ids), slot, first_position))
        self.prefix_slot.append(slot if prefix_slot is None else prefix_slot)
        self.logits_at.append(start + len(ids) - 1)
        return len(self.logits_at) - 1

    def build(
        self,
        device: torch.device,
        last_token: torch.Tensor,
        kv_groups: int,
        kv_heads: int | None = None,
        flash_prefixes: bool = False,
    ) -> StepPlan:
        """The step's device tensors; with ``kv_heads``, the suffixes' two-pass layout too
        (:mod:`.suffix_attention`), with ``flash_prefixes`` the image prefixes' own attention
        (:mod:`.prefix_attention`; both on the CUDA kernel path)."""

        def tensor(values):
            return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)

        ids = tensor(self.ids)
        if self.decode_at:
            ids[tensor(self.decode_at)] = last_token[tensor(self.decode_slots)]
        full, reads, prefixes, full_start = None, self.full, None, 0
        if flash_prefixes and self.bos:  # each prefix is one entry of ``full``, a bos its first token
            prefixes = prefix_attention.Prefixes.of(
                [count for _, count, *_ in reads[: len(self.bos)]], device
            )
            full_start = prefixes.tokens
            reads = [(start - full_start, *rest) for start, *rest in reads[len(self.bos) :]]
        if reads:
            full = slot_attention.Sequences.of(reads, self.stride, kv_groups, device)
        causal = suffix = None
        if self.causal:
            causal = slot_attention.Dense.causal(self.causal, self.stride, device)
        if self.causal and kv_heads:
            first = self.causal[0][0]
            rows = [
                (start - first, count, prefix * self.stride, position, slot * self.stride + position)
                for (start, count, slot, position), prefix in zip(self.causal, self.prefix_slot)
            ]
            suffix = suffix_attention.layout(rows, kv_heads, kv_groups, device)
        return StepPlan(
            ids=ids,
            positions=tensor(self.positions),
            write_src=tensor(self.write_src),
            write_dst=tensor(self.write_dst),
            full=full,
            causal=causal,
            suffix=suffix,
            bos=tensor(self.bos) if self.bos else None,
            logits_at=tensor(self.logits_at),
            feature_at=tensor(self.feature_at) if self.feature_at else None,
            prefixes=prefixes,
            full_start=full_start,
        )


def apply_rotary(query, key, cos, sin):
    """Rotary position embedding as Molmo2's ``apply_rotary_pos_emb`` computes it (``[batch,
    heads, tokens, dim]``; ``cos``/``sin`` ``[batch, tokens, dim]``). Written out here because the
    Molmo v1 profile's transformers (4.5x) has no molmo2 module to import it from."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return query * cos + _rotate_half(query) * sin, key * cos + _rotate_half(key) * sin


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def forward(model, plan: StepPlan, keys: list[torch.Tensor], values: list[torch.Tensor], varlen: bool):
    """Next-token logits (float32) at ``plan.logits_at``; writes every token's keys/values into
    the pool ``keys``/``values`` (per layer ``[tokens, kv_heads, head_dim]``).
    ``varlen``: whole-prefix reads go through CUDA's variable-length kernel, else dense SDPA."""
    lm = model.model.language_model
    hidden = lm.embed_tokens(plan.ids)
    if plan.features is not None:
        # Molmo2 adds the pooled vision features onto the image tokens' embeddings
        hidden = hidden.index_add(0, plan.feature_at, plan.features.to(hidden.dtype))
    hidden = hidden[None]
    positions = plan.positions[None]
    rope = {"scaled": lm.rotary_emb(hidden, positions), "unscaled": lm.rotary_emb_unscaled(hidden, positions)}
    # the one-kernel rotary embedding where the engine installed it for decode steps and generate()
    rotate = fused_rotary.apply_rotary_pos_emb if fused_rotary.installed() else apply_rotary
    for index, layer in enumerate(lm.layers):
        cos_sin = rope[lm.rope_types[index]]
        hidden = _layer(layer, hidden, cos_sin, plan, keys[index], values[index], varlen, rotate)
    hidden = lm.norm(hidden[0, plan.logits_at])
    return model.lm_head(hidden).float()


def _layer(layer, hidden, cos_sin, plan: StepPlan, keys, values, varlen: bool, rotate):
    """``Molmo2DecoderLayer.forward`` with our attention over the slot cache."""
    attn = layer.self_attn
    count, head_dim = hidden.shape[1], attn.head_dim
    residual = hidden
    x = hidden if layer.norm_after else layer.input_layernorm(hidden)
    query, key = attn.q_proj(x), attn.k_proj(x)
    value = attn.v_proj(x).view(count, -1, head_dim)
    if attn.qk_norm_type == "olmo":
        query, key = attn.q_norm(query), attn.k_norm(key)
    query, key = query.view(1, count, -1, head_dim), key.view(1, count, -1, head_dim)
    if attn.qk_norm_type == "qwen3":
        query, key = attn.q_norm(query), attn.k_norm(key)
    cos, sin = cos_sin
    query, key = rotate(query.transpose(1, 2), key.transpose(1, 2), cos, sin)
    query, key = query.transpose(1, 2)[0], key.transpose(1, 2)[0]  # [tokens, heads, dim]
    flat_keys, flat_values = keys, values
    flat_keys.index_copy_(0, plan.write_dst, key[plan.write_src])
    flat_values.index_copy_(0, plan.write_dst, value[plan.write_src])
    out = torch.empty_like(query)
    if plan.prefixes is not None:
        out[: plan.prefixes.tokens] = prefix_attention.attend(query, key, value, plan.prefixes, attn.scaling)
    if plan.full is not None:
        start, end = plan.full_start, plan.full_start + plan.full.tokens
        if varlen:
            out[start:end] = slot_attention.varlen_attention(
                query[start:end], flat_keys, flat_values, plan.full, attn.scaling
            )
        else:
            out[:end] = slot_attention.dense_attention(query, keys, values, plan.full.dense, attn.scaling)
    if varlen and plan.bos is not None:  # a bos token sees only itself: its output is its value
        out[plan.bos] = value[plan.bos].repeat_interleave(attn.num_key_value_groups, dim=1)
    if plan.suffix is not None:
        start = plan.causal.start
        out[start:] = suffix_attention.attend(
            query[start:], flat_keys, flat_values, plan.suffix, attn.scaling
        )
    elif plan.causal is not None:
        start = plan.causal.start
        out[start:] = slot_attention.dense_attention(query, keys, values, plan.causal, attn.scaling)
    out = attn.o_proj(out.reshape(1, count, -1))
    if layer.norm_after:
        out = layer.input_layernorm(out)
    hidden = residual + out
    residual = hidden
    x = hidden if layer.norm_after else layer.post_attention_layernorm(hidden)
    x = layer.mlp(x)
    if layer.norm_after:
        x = layer.post_attention_layernorm(x)
    return residual + x
