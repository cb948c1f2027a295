"""File formats: safetensors (``pyqkern.io.safetensors``) and PEFT LoRA adapters (``pyqkern.io.peft``)."""
from __future__ import annotations

from . import peft, safetensors
from .peft import load_peft_adapter, save_peft_adapter

__all__ = ["safetensors", "peft", "load_peft_adapter", "save_peft_adapter"]
