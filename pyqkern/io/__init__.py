"""File formats: safetensors (``pyqkern.io.safetensors``), PEFT LoRA adapters (``pyqkern.io.peft``),
GGUF (``pyqkern.io.gguf``: load_gguf / save_gguf) and pyqkern's QTensor safetensors layout
(``pyqkern.io.qsave``: save / load); converters from and to other runtimes' quantized tensors:
GPTQ (from_gptq / to_gptq, load_gptq_dir for GPTQ, AWQ and compressed-tensors checkpoint
directories), AWQ (convert_awq), compressed-tensors (convert_ct), bitsandbytes NF4 / FP4
(convert_bnb) and ONNX Runtime MatMulNBits (convert_ort, load_onnx_matmulnbits)."""
from __future__ import annotations

from . import gguf, peft, qsave, safetensors
from .gguf import load_gguf, save_gguf
from .peft import load_peft_adapter, save_peft_adapter
from . import convert_awq, convert_bnb, convert_ct, convert_gptq, convert_ort
from .convert_awq import from_awq, to_awq
from .convert_bnb import from_bnb, from_bnb_nf4, to_bnb, to_bnb_nf4
from .convert_ct import from_compressed_tensors, to_compressed_tensors
from .convert_gptq import from_gptq, load_gptq_dir, to_gptq
from .convert_ort import from_ort_nbits, load_onnx_matmulnbits, to_onnx_matmulnbits, to_ort_nbits
from .qsave import load, save

__all__ = ["safetensors", "peft", "gguf", "qsave", "load_peft_adapter", "save_peft_adapter", "load_gguf", "save_gguf",
           "load", "save"]
__all__ += ["load_onnx_matmulnbits", "convert_gptq", "convert_awq", "convert_ort", "convert_bnb", "convert_ct", "from_gptq", "to_gptq", "load_gptq_dir",
            "from_awq", "to_awq", "from_ort_nbits", "to_ort_nbits", "to_onnx_matmulnbits", "from_bnb", "to_bnb",
            "from_bnb_nf4", "to_bnb_nf4",
            "from_compressed_tensors", "to_compressed_tensors"]
