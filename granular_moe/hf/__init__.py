"""Hugging Face interchange: ``granular-moe export-hf`` writes a main-job checkpoint as a ``transformers`` model
folder, ``granular-moe import-hf`` writes such a folder as a checkpoint the main job loads, both streamed a
group of tensors at a time (never the whole model), over ``--workers`` processes or torchrun's ranks;
``granular-moe verify-hf`` compares the two layer by layer.

- :mod:`granular_moe.hf.families`: one module per family (Qwen3-MoE, DeepSeek-V3, Mixtral, Qwen2-MoE,
  OLMoE, GLM-4.5): what it represents (refused options named by their main-job flag), its ``config.json``
  from the job's flags and back, its weight mappings;
- :mod:`granular_moe.hf.mappings`: the declarative mappings (one group of the job's tensors and the Hugging
  Face tensors made from them, both ways);
- :mod:`granular_moe.hf.targets`: choosing the family, the errors;
- :mod:`granular_moe.hf.skeleton`: the job's model with its parameters on the meta device, and the layout of
  its ``torch_dist`` checkpoint as megatron-core makes it;
- :mod:`granular_moe.hf.checkpoint_reader` / :mod:`granular_moe.hf.checkpoint_writer`: that checkpoint read
  and written a few tensors at a time; :mod:`granular_moe.hf.safetensors_io`: the Hugging Face side;
- :mod:`granular_moe.hf.parallel`: workers and torchrun's ranks;
- :mod:`granular_moe.hf.megatron_io`: the job's whole model in one process (the reference the streaming
  conversions are tested against);
- :mod:`granular_moe.hf.tokenizer`: the job's SentencePiece model as a ``transformers`` tokenizer;
- :mod:`granular_moe.hf.export`, :mod:`granular_moe.hf.import_hf`, :mod:`granular_moe.hf.verify`: the commands.

``transformers`` and ``safetensors`` come with the ``hf`` extra (``pip install -e ".[hf]"``).
"""

from granular_moe.hf.targets import TARGETS, HfExportError, HfImportError

__all__ = ["TARGETS", "HfExportError", "HfImportError"]
