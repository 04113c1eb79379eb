"""Swapping the forward of one model instance's modules of a class, and restoring it.

The fused kernels (:mod:`.fused_norms`, :mod:`.fused_mlp`) replace a module's forward on the
instance, not on Hugging Face's class, so the engine's steps and plain ``generate()`` on that
model compute the same thing while other models in the process keep Hugging Face's code."""

from __future__ import annotations

import types
from collections.abc import Callable

import torch


def of_class(model: torch.nn.Module, class_name: str) -> list[torch.nn.Module]:
    """The modules of ``model`` whose class is named ``class_name``."""
    return [module for module in model.modules() if type(module).__name__ == class_name]


def swap(modules: list[torch.nn.Module], forward: Callable) -> None:
    """Give each of ``modules`` ``forward`` (called with the module as ``self``)."""
    for module in modules:
        module.forward = types.MethodType(forward, module)


def restore(model: torch.nn.Module, class_name: str) -> int:
    """Give the modules of that class their class's forward back; returns how many had another."""
    swapped = [module for module in of_class(model, class_name) if "forward" in vars(module)]
    for module in swapped:
        del module.forward
    return len(swapped)
