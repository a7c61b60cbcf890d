"""Hugging Face interchange: ``granular-moe export-hf`` writes a main-job checkpoint as a ``transformers`` model
folder (Qwen3-MoE or DeepSeek-V3), ``granular-moe import-hf`` writes such a folder as a checkpoint the main job
loads.

- :mod:`granular_moe.hf.targets`: what each target represents (refused options named by their main-job flag),
  its ``config.json`` from the job's flags and back;
- :mod:`granular_moe.hf.weights`: the tensor names and layouts of each target, both ways;
- :mod:`granular_moe.hf.megatron_io`: the job's model at TP = PP = EP = 1 in one gloo process, loaded from or
  saved to a ``torch_dist`` checkpoint;
- :mod:`granular_moe.hf.tokenizer`: the job's SentencePiece model as a ``transformers`` tokenizer;
- :mod:`granular_moe.hf.export` and :mod:`granular_moe.hf.import_hf`: the two commands.

``transformers`` and ``safetensors`` come with the ``hf`` extra (``pip install -e ".[hf]"``).
"""

from granular_moe.hf.targets import TARGETS, HfExportError, HfImportError

__all__ = ["TARGETS", "HfExportError", "HfImportError"]
