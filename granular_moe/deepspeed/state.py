"""``GranularMoE``'s state dict in the layout of DeepSpeed's own ``MoE`` layer, which DeepSpeed's checkpoints rely on.

DeepSpeed's engine saves an MoE layer's experts one file per expert
(``layer_{l}_expert_{e}_mp_rank_00_model_states.pt``, ``e`` the global expert index): it takes from the layer's
state dict every key that holds ``expert`` (except the gate's ``moe.gate.wg.weight``) and reads the local expert
index after ``.deepspeed_moe.experts.deepspeed_experts.``; the other keys go to the model file. ``load_checkpoint``
reads this rank's experts' files back by global index. The granular layer holds each weight of all its local experts
in one 3-D parameter, so its state dict is presented in ``MoE``'s names:

====================================================  =================================================================
parameter / buffer                                    state-dict key (under the layer's prefix)
====================================================  =================================================================
``deepspeed_moe.experts.weight1 [L, h, f]``           ``deepspeed_moe.experts.deepspeed_experts.{i}.weight1 [h, f]``
``deepspeed_moe.experts.weight2 [L, f, h]``           ``deepspeed_moe.experts.deepspeed_experts.{i}.weight2 [f, h]``
``deepspeed_moe.router.weight [E, h]``                ``deepspeed_moe.gate.wg.weight`` (``MoE``'s gate, same layout)
``deepspeed_moe.router.expert_bias [E]``              ``deepspeed_moe.gate.e_score_correction_bias``
``deepspeed_moe.shared_experts.*``                    ``deepspeed_moe.shared_mlp.*``
====================================================  =================================================================

(``i`` the local expert index, as in ``MoE``; the renamed keys keep the word ``expert`` out of what is not an
expert's.) ``load_state_dict`` takes these keys (and the parameters' own names too).
"""

from __future__ import annotations

import re

import torch

EXPERT_WEIGHTS = ("weight1", "weight2")
EXPERTS = "deepspeed_moe.experts."
PER_EXPERT = EXPERTS + "deepspeed_experts.{index}.{name}"
RENAMED = (  # (parameter name prefix, MoE-layout key prefix)
    ("deepspeed_moe.router.weight", "deepspeed_moe.gate.wg.weight"),
    ("deepspeed_moe.router.expert_bias", "deepspeed_moe.gate.e_score_correction_bias"),
    ("deepspeed_moe.shared_experts.", "deepspeed_moe.shared_mlp."),
)
_PER_EXPERT_KEY = re.compile(r"deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(weight1|weight2)$")


def _renamed(relative: str, renames) -> str:
    for old, new in renames:
        if relative.startswith(old):
            return new + relative[len(old):]
    return relative


def to_deepspeed_layout(module, state_dict, prefix: str, local_metadata) -> None:
    """State-dict post hook: the layer's keys in ``MoE``'s layout (the module docstring's table)."""
    for key in [key for key in state_dict if key.startswith(prefix)]:
        relative = key[len(prefix):]
        if relative.startswith(EXPERTS) and relative[len(EXPERTS):] in EXPERT_WEIGHTS:
            name = relative[len(EXPERTS):]
            stacked = state_dict.pop(key)
            for index in range(stacked.shape[0]):
                state_dict[prefix + PER_EXPERT.format(index=index, name=name)] = stacked[index]
        else:
            renamed = _renamed(relative, RENAMED)
            if renamed != relative:
                state_dict[prefix + renamed] = state_dict.pop(key)


def from_deepspeed_layout(module, state_dict, prefix: str, local_metadata, strict, missing_keys, unexpected_keys,
                          error_msgs) -> None:
    """Load-state-dict pre hook: ``MoE``-layout keys back to the parameters' names, the per-expert tensors stacked
    in local expert order (a checkpoint of another number of local experts is left for ``load_state_dict`` to
    report: missing or unexpected keys)."""
    per_expert: dict = {}
    for key in [key for key in state_dict if key.startswith(prefix)]:
        relative = key[len(prefix):]
        match = _PER_EXPERT_KEY.match(relative)
        if match:
            per_expert.setdefault(match.group(2), {})[int(match.group(1))] = key
            continue
        renamed = _renamed(relative, [(new, old) for old, new in RENAMED])
        if renamed != relative:
            state_dict[prefix + renamed] = state_dict.pop(key)
    for name, keys in per_expert.items():
        if sorted(keys) == list(range(module.num_local_experts)):
            state_dict[prefix + EXPERTS + name] = torch.stack([state_dict.pop(keys[i]) for i in sorted(keys)])


def register_deepspeed_layout(module: torch.nn.Module) -> None:
    """Present ``module``'s state dict in ``MoE``'s layout and load it back from there."""
    module.register_state_dict_post_hook(to_deepspeed_layout)
    module.register_load_state_dict_pre_hook(from_deepspeed_layout)
