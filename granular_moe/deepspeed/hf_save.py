"""A model whose MoE blocks :func:`~granular_moe.deepspeed.replace_moe_blocks` replaced, written as a Hugging Face
folder again (``save_pretrained`` of the model's own ``transformers`` class), loadable with ``from_pretrained``.

Every block becomes its original class again, fine-grained: ``E * G`` experts of FFN size ``I / G``, top ``k * G``
(``num_local_experts``, ``num_experts_per_tok``, ``moe_intermediate_size`` / Mixtral's ``intermediate_size``;
DeepSeek-V3's ``n_shared_experts`` times ``G``, so its shared expert keeps its width), the router's rows, the
experts' fused ``gate_up_proj`` / ``down_proj`` and DeepSeek-V3's ``e_score_correction_bias`` and shared expert from
the GranularMoE layers, gathered over the expert-parallel ranks; everything else is the model's own. At granularity
1 that is the original architecture with the trained weights. What the fine-grained Hugging Face model would compute
differently is refused before anything is written: DeepSeek-V3's group-limited routing at granularity > 1 (it scores
a group by its 2 best experts, the granular router by its best ``k * G / topk_group``).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.distributed as dist

from granular_moe.deepspeed.hf_blocks import GranularMoEBlock, UnsupportedMoEBlockError

EXPERT_SIZE_FIELD = {"Qwen3MoeSparseMoeBlock": "moe_intermediate_size", "MixtralSparseMoeBlock": "intermediate_size",
                     "DeepseekV3MoE": "moe_intermediate_size"}


def _blocks(model) -> list:
    blocks = [(name, module) for name, module in model.named_modules() if isinstance(module, GranularMoEBlock)]
    if not blocks:
        raise UnsupportedMoEBlockError(
            f"{type(model).__name__} has no GranularMoE blocks: save it with save_pretrained")
    return blocks


def _gathered(tensor: torch.Tensor, group) -> torch.Tensor:
    """``tensor [L, ...]`` of every expert-parallel rank, concatenated in rank (expert) order."""
    if group is None or dist.get_world_size(group) == 1:
        return tensor.detach().clone()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.detach().contiguous(), group=group)
    return torch.cat(parts)


def _block_tensors(name: str, block: GranularMoEBlock) -> dict:
    """The Hugging Face tensors of one block (all experts: collective over its expert-parallel group)."""
    layer = block.moe.deepspeed_moe
    group = _expert_parallel_group(block.moe) if block.moe.ep_size > 1 else None
    weight1 = _gathered(layer.experts.weight1, group)  # [E G, h, 2 n]
    weight2 = _gathered(layer.experts.weight2, group)  # [E G, n, h]
    tensors = {f"{name}.gate.weight": layer.router.weight.detach().clone(),
               f"{name}.experts.gate_up_proj": weight1.transpose(1, 2).contiguous(),
               f"{name}.experts.down_proj": weight2.transpose(1, 2).contiguous()}
    if block.source == "DeepseekV3MoE":
        tensors[f"{name}.gate.e_score_correction_bias"] = layer.router.expert_bias.detach().clone()
        shared = layer.shared_experts
        gate, up = shared.linear_fc1.weight.detach().chunk(2)
        tensors.update({f"{name}.shared_experts.gate_proj.weight": gate.clone(),
                        f"{name}.shared_experts.up_proj.weight": up.clone(),
                        f"{name}.shared_experts.down_proj.weight": shared.linear_fc2.weight.detach().clone()})
    return tensors


def _expert_parallel_group(moe):
    from granular_moe.deepspeed.groups import expert_groups

    return expert_groups(moe.ep_size, moe.ranks_per_node).expert_parallel


def fine_grained_config(model, blocks: list):
    """The model's config with the blocks' fine-grained sizes; refuses what the Hugging Face class would compute
    differently."""
    config = copy.deepcopy(model.config)
    moe, source = blocks[0][1].moe, blocks[0][1].source
    G = moe.granularity
    if source == "DeepseekV3MoE" and G > 1 and config.n_group > 1 and config.topk_group < config.n_group:
        raise UnsupportedMoEBlockError(
            f"granularity {G} with DeepSeek-V3's group-limited routing (n_group {config.n_group}, topk_group "
            f"{config.topk_group}): transformers' DeepseekV3 scores a group by its 2 best experts, the granular router "
            f"by its best {moe.topk // config.topk_group}; the fine-grained model cannot be written as DeepSeek-V3 "
            f"(valid: granularity 1, or topk_group = n_group)")
    field = EXPERT_SIZE_FIELD[source]
    config.num_local_experts = moe.num_experts
    config.num_experts_per_tok = moe.topk
    setattr(config, field, getattr(config, field) // G)
    if source == "DeepseekV3MoE":
        config.n_shared_experts = config.n_shared_experts * G
    return config


def save_hf(model, directory, **save_pretrained_kwargs) -> Path | None:
    """Write ``model`` (with GranularMoE blocks; a DeepSpeed engine's ``module`` at ZeRO 0-2) to ``directory`` as a
    Hugging Face folder of its own class. Collective (the experts are gathered over the expert-parallel ranks); rank
    0 writes. Returns the folder on rank 0, None elsewhere."""
    blocks = _blocks(model)
    config = fine_grained_config(model, blocks)
    tensors = {}
    for name, block in blocks:
        tensors.update(_block_tensors(name, block))
    if dist.is_initialized() and dist.get_rank() != 0:
        dist.barrier()
        return None
    prefixes = tuple(name + "." for name, _ in blocks)
    state = {key: value for key, value in model.state_dict().items() if not key.startswith(prefixes)}
    state.update(tensors)
    with torch.device("meta"):
        hf_model = type(model)(config)
    hf_model.load_state_dict(state, strict=True, assign=True)
    directory = Path(directory)
    hf_model.save_pretrained(str(directory), **save_pretrained_kwargs)
    if dist.is_initialized():
        dist.barrier()
    return directory
