"""Molmo2's query, key and value projections as one matrix product, and its MLP's gate and up.

Hugging Face's ``Molmo2Attention`` multiplies a layer's input by three weights in turn (4,096,
1,024 and 1,024 outputs for Molmo2-8B) and its ``Molmo2MLP`` by two (12,288 each). In a decode
step of a few hundred rows each product is small, and the two 1,024-wide ones leave most of an
H100 idle: one product over the joined weights did the attention's three in 0.025 ms a layer
against 0.046 at 128 rows (bench/kernel-variants-h100.json), about 0.8 ms a decode step.

:func:`join` stacks each layer's weights once (the separate projections become views of the
stack, and the memory they held goes back to the GPU, so no memory is added) and gives its attention and MLP a forward over the stack, for
every path on this model instance (the engine's steps and plain ``generate()`` compute the same
thing). The forwards are Hugging Face's (transformers 5.23) but for the products.
:func:`unjoin` restores Hugging Face's forwards (the benchmark's side-by-side variant).
"""

from __future__ import annotations

import types

import torch
from torch.nn import functional

ATTENTION_CLASS, MLP_CLASS = "Molmo2Attention", "Molmo2MLP"


def _stack(*linears) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The linears' weights (and biases) stacked, each linear's own now a view of the stack."""
    weight = torch.cat([linear.weight.detach() for linear in linears])
    biases = [linear.bias for linear in linears]
    bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
    start = 0
    for linear in linears:
        end = start + linear.weight.shape[0]
        linear.weight = torch.nn.Parameter(weight[start:end], requires_grad=False)
        if bias is not None:
            linear.bias = torch.nn.Parameter(bias[start:end], requires_grad=False)
        start = end
    return weight, bias


def _attention_forward(
    self, hidden_states, position_embeddings, attention_mask, past_key_values=None, **kwargs
):
    from transformers.models.molmo2 import modeling_molmo2 as hf

    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    joined = functional.linear(hidden_states, self.joined_weight, self.joined_bias)
    query_states, key_states, value_states = joined.split(self.joined_sizes, dim=-1)
    value_states = value_states.reshape(hidden_shape).transpose(1, 2)
    if self.qk_norm_type == "olmo":
        query_states, key_states = self.q_norm(query_states), self.k_norm(key_states)
    query_states, key_states = query_states.reshape(hidden_shape), key_states.reshape(hidden_shape)
    if self.qk_norm_type == "qwen3":
        query_states, key_states = self.q_norm(query_states), self.k_norm(key_states)
    cos, sin = position_embeddings
    query_states, key_states = hf.apply_rotary_pos_emb(
        query_states.transpose(1, 2), key_states.transpose(1, 2), cos, sin
    )
    if past_key_values is not None:
        key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)
    interface = hf.ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, hf.eager_attention_forward
    )
    attn_output, attn_weights = interface(
        self, query_states, key_states, value_states, attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling, **kwargs,
    )  # fmt: skip
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    return self.o_proj(attn_output), attn_weights


def _mlp_forward(self, x):
    gate, up = functional.linear(x, self.joined_weight).split(self.joined_sizes, dim=-1)
    return self.down_proj(self.act_fn(gate) * up)


def join(model: torch.nn.Module) -> int:
    """Give every Molmo2 attention and MLP of ``model`` its joined product; returns how many."""
    count = 0
    for module in model.modules():
        kind = type(module).__name__
        if kind not in (ATTENTION_CLASS, MLP_CLASS) or "forward" in vars(module):
            continue
        if kind == ATTENTION_CLASS:
            linears, forward = (module.q_proj, module.k_proj, module.v_proj), _attention_forward
        else:
            linears, forward = (module.gate_proj, module.up_proj), _mlp_forward
            if module.gate_proj.bias is not None or module.up_proj.bias is not None:
                continue  # Hugging Face's MLP has none; a checkpoint with biases keeps its forward
        module.joined_weight, module.joined_bias = _stack(*linears)
        module.joined_sizes = [linear.weight.shape[0] for linear in linears]
        module.forward = types.MethodType(forward, module)
        count += 1
    if count and torch.cuda.is_initialized():
        # the separate weights' old memory back to the GPU: the cache pool is sized by what the
        # GPU reports free, which memory kept by torch's allocator is not (~9 GB for Molmo2-8B)
        torch.cuda.empty_cache()
    return count


def unjoin(model: torch.nn.Module) -> int:
    """Undo :func:`join`'s forwards (the weights stay views of the stacks); returns how many."""
    count = 0
    for module in model.modules():
        if type(module).__name__ in (ATTENTION_CLASS, MLP_CLASS) and "forward" in vars(module):
            del module.forward
            count += 1
    return count
