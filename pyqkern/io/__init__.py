"""File formats: safetensors (``pyqkern.io.safetensors``), PEFT LoRA adapters (``pyqkern.io.peft``),
GGUF (``pyqkern.io.gguf``: load_gguf / save_gguf) and pyqkern's QTensor safetensors layout
(``pyqkern.io.qsave``: save / load)."""
from __future__ import annotations

from . import gguf, peft, qsave, safetensors
from .gguf import load_gguf, save_gguf
from .peft import load_peft_adapter, save_peft_adapter
from .qsave import load, save

__all__ = ["safetensors", "peft", "gguf", "qsave", "load_peft_adapter", "save_peft_adapter", "load_gguf", "save_gguf",
           "load", "save"]
