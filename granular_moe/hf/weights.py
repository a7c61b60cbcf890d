"""Tensor names and layouts: the main job's megatron-core ``GPTModel`` (one process, TP = PP = EP = 1) and a
Hugging Face target's checkpoint, both ways.

Hugging Face checkpoints store each routed expert on its own (``mlp.experts.{i}.gate_proj/up_proj/down_proj``,
``[out, in]``); ``transformers`` fuses them into 3-D tensors when it loads (and splits them again when it
saves). The granular layer holds ``experts.weight1 [E, hidden, 2 n]`` (the gate, which the activation takes,
then the linear "up" half: ``act(h[:, :n]) * h[:, n:]``) and ``experts.weight2 [E, n, hidden]``;
megatron-core's dense and shared-expert MLPs hold ``linear_fc1 [2 f, hidden]`` ([gate; up]) and
``linear_fc2 [hidden, f]``. megatron-core's fused ``linear_qkv`` holds, for each key/value group, its query
heads, then its key head, then its value head. Latent attention has the same layouts in both (each head's
query and key ``[no-rope part, rope part]``, the key/value latent ``[latent, rope part]``, the up projection
per head ``[key, value]``).
"""

from __future__ import annotations

import torch

from granular_moe.hf.targets import head_dim, moe_pattern


def _attention_names(args, target: str) -> dict[str, str]:
    """megatron-core attention parameter -> the target's (one-to-one ones)."""
    if target == "qwen3_moe":
        return {"linear_proj": "o_proj", "q_layernorm": "q_norm", "k_layernorm": "k_norm"}
    names = {"linear_proj": "o_proj", "linear_kv_down_proj": "kv_a_proj_with_mqa", "kv_layernorm": "kv_a_layernorm",
             "linear_kv_up_proj": "kv_b_proj"}
    if args.q_lora_rank is None:
        names["linear_q_proj"] = "q_proj"
    else:
        names.update(linear_q_down_proj="q_a_proj", q_layernorm="q_a_layernorm", linear_q_up_proj="q_b_proj")
    return names


def _qkv_sizes(args) -> tuple[int, int, int]:
    heads = args.num_attention_heads
    groups = args.num_query_groups if getattr(args, "group_query_attention", False) else heads
    return heads, groups, head_dim(args)


def split_qkv(weight: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    heads, groups, dim = _qkv_sizes(args)
    per_group = weight.view(groups, (heads // groups + 2) * dim, -1)
    q, k, v = torch.split(per_group, [heads // groups * dim, dim, dim], dim=1)
    return q.reshape(heads * dim, -1), k.reshape(groups * dim, -1), v.reshape(groups * dim, -1)


def join_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, args) -> torch.Tensor:
    heads, groups, dim = _qkv_sizes(args)
    hidden = q.shape[-1]
    joined = torch.cat([q.view(groups, heads // groups * dim, hidden), k.view(groups, dim, hidden),
                        v.view(groups, dim, hidden)], dim=1)
    return joined.reshape(-1, hidden)


def _gated(prefix: str, fc1: torch.Tensor, fc2: torch.Tensor) -> dict[str, torch.Tensor]:
    gate, up = fc1.chunk(2, dim=0)
    return {f"{prefix}.gate_proj.weight": gate, f"{prefix}.up_proj.weight": up, f"{prefix}.down_proj.weight": fc2}


def megatron_to_hf(state: dict, args, target: str, vocab_size: int) -> dict[str, torch.Tensor]:
    """The target's tensors (names in checkpoint order, contiguous) from the megatron-core model's state dict.
    ``vocab_size``: rows of the embedding and output layer to keep (the padded vocabulary's first rows)."""
    out = {"model.embed_tokens.weight": state["embedding.word_embeddings.weight"][:vocab_size]}
    pattern = moe_pattern(args)
    for layer in range(args.num_layers):
        src, dst = f"decoder.layers.{layer}.", f"model.layers.{layer}."
        out[dst + "input_layernorm.weight"] = state[src + "input_layernorm.weight"]
        if target == "qwen3_moe":
            q, k, v = split_qkv(state[src + "self_attention.linear_qkv.weight"], args)
            out.update({dst + "self_attn.q_proj.weight": q, dst + "self_attn.k_proj.weight": k,
                        dst + "self_attn.v_proj.weight": v})
        for name, hf_name in _attention_names(args, target).items():
            out[f"{dst}self_attn.{hf_name}.weight"] = state[f"{src}self_attention.{name}.weight"]
        out[dst + "post_attention_layernorm.weight"] = state[src + "pre_mlp_layernorm.weight"]
        if not pattern[layer]:
            out.update(_gated(dst + "mlp", state[src + "mlp.linear_fc1.weight"], state[src + "mlp.linear_fc2.weight"]))
            continue
        out[dst + "mlp.gate.weight"] = state[src + "mlp.router.weight"]
        if target == "deepseek_v3":
            bias = state.get(src + "mlp.router.expert_bias")
            out[dst + "mlp.gate.e_score_correction_bias"] = (
                torch.zeros(args.num_experts, dtype=torch.float32) if bias is None else bias.float())
        weight1, weight2 = state[src + "mlp.experts.weight1"], state[src + "mlp.experts.weight2"]
        for expert in range(args.num_experts):
            out.update(_gated(f"{dst}mlp.experts.{expert}", weight1[expert].t(), weight2[expert].t()))
        if target == "deepseek_v3":
            out.update(_gated(dst + "mlp.shared_experts", state[src + "mlp.shared_experts.linear_fc1.weight"],
                              state[src + "mlp.shared_experts.linear_fc2.weight"]))
    out["model.norm.weight"] = state["decoder.final_layernorm.weight"]
    if args.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = state["output_layer.weight"][:vocab_size]
    return {name: tensor.detach().cpu().contiguous() for name, tensor in out.items()}


def hf_to_megatron(tensors: dict, args, target: str, template: dict) -> dict[str, torch.Tensor]:
    """The megatron-core state dict (every tensor of ``template``, the model's own state dict, filled) from the
    target's tensors. Raises KeyError naming a tensor the checkpoint lacks, ValueError for unused ones."""
    used = set()

    def take(name: str) -> torch.Tensor:
        if name not in tensors:
            raise KeyError(f"the Hugging Face checkpoint has no tensor {name!r}")
        used.add(name)
        return tensors[name]

    def gated(prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
        fc1 = torch.cat([take(f"{prefix}.gate_proj.weight"), take(f"{prefix}.up_proj.weight")], dim=0)
        return fc1, take(f"{prefix}.down_proj.weight")

    def padded(rows: torch.Tensor, name: str) -> torch.Tensor:
        full = torch.zeros_like(template[name])
        full[: rows.shape[0]] = rows
        return full

    out = {"embedding.word_embeddings.weight": padded(take("model.embed_tokens.weight"),
                                                      "embedding.word_embeddings.weight")}
    pattern = moe_pattern(args)
    for layer in range(args.num_layers):
        src, dst = f"model.layers.{layer}.", f"decoder.layers.{layer}."
        out[dst + "input_layernorm.weight"] = take(src + "input_layernorm.weight")
        if target == "qwen3_moe":
            out[dst + "self_attention.linear_qkv.weight"] = join_qkv(
                *(take(f"{src}self_attn.{name}_proj.weight") for name in "qkv"), args)
        for name, hf_name in _attention_names(args, target).items():
            out[f"{dst}self_attention.{name}.weight"] = take(f"{src}self_attn.{hf_name}.weight")
        out[dst + "pre_mlp_layernorm.weight"] = take(src + "post_attention_layernorm.weight")
        if not pattern[layer]:
            out[dst + "mlp.linear_fc1.weight"], out[dst + "mlp.linear_fc2.weight"] = gated(src + "mlp")
            continue
        out[dst + "mlp.router.weight"] = take(src + "mlp.gate.weight")
        if target == "deepseek_v3":
            out[dst + "mlp.router.expert_bias"] = take(src + "mlp.gate.e_score_correction_bias").float()
            fc1, fc2 = gated(src + "mlp.shared_experts")
            out[dst + "mlp.shared_experts.linear_fc1.weight"] = fc1
            out[dst + "mlp.shared_experts.linear_fc2.weight"] = fc2
        pairs = [gated(f"{src}mlp.experts.{expert}") for expert in range(args.num_experts)]
        out[dst + "mlp.experts.weight1"] = torch.stack([fc1.t() for fc1, _ in pairs])
        out[dst + "mlp.experts.weight2"] = torch.stack([fc2.t() for _, fc2 in pairs])
    out["decoder.final_layernorm.weight"] = take("model.norm.weight")
    if args.untie_embeddings_and_output_weights:
        out["output_layer.weight"] = padded(take("lm_head.weight"), "output_layer.weight")
    unused = sorted(set(tensors) - used)
    if unused:
        raise ValueError(f"the Hugging Face checkpoint holds tensors the model has no place for: {unused[:8]}")
    missing = sorted(name for name, value in template.items()
                     if isinstance(value, torch.Tensor) and not name.endswith("_extra_state") and name not in out)
    if missing:
        raise KeyError(f"no Hugging Face tensor fills {missing[:8]}")
    return {name: tensor.to(template[name].dtype).contiguous() for name, tensor in out.items()}


# config.json's name for each of the job's sizes, by target (a dimension is named by the keys it comes from)
_EXPERTS_KEY = {"qwen3_moe": "num_local_experts", "deepseek_v3": "n_routed_experts"}


EXPERT = "{expert}"  # in a name of hf_tensor_shapes: one such tensor per routed expert


def hf_tensor_shapes(args, target: str, vocab_size: int) -> dict[str, tuple[tuple[int, str], ...]]:
    """Every tensor of the target's checkpoint of the model ``args`` describe (the names
    :func:`megatron_to_hf` writes, in its order), a routed expert's once with :data:`EXPERT` in its name: its
    shape, each dimension as ``(size, the config.json keys it comes from)``. Nothing is allocated and nothing
    grows with the sizes: the import checks a config and a checkpoint's headers against it."""
    def dim(size: int, key: str) -> tuple[int, str]:
        return int(size), key

    hidden, vocab = dim(args.hidden_size, "hidden_size"), dim(vocab_size, "vocab_size")
    heads = args.num_attention_heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    attention = {}
    if target == "qwen3_moe":
        _, groups, width = _qkv_sizes(args)
        queries = dim(heads * width, "num_attention_heads x head_dim")
        keys = dim(groups * width, "num_key_value_heads x head_dim")
        attention = {"q_proj": (queries, hidden), "k_proj": (keys, hidden), "v_proj": (keys, hidden),
                     "o_proj": (hidden, queries), "q_norm": (dim(width, "head_dim"),),
                     "k_norm": (dim(width, "head_dim"),)}
    else:
        query = dim(heads * (args.qk_head_dim + args.qk_pos_emb_head_dim),
                    "num_attention_heads x (qk_nope_head_dim + qk_rope_head_dim)")
        latent = dim(args.kv_lora_rank, "kv_lora_rank")
        if args.q_lora_rank is None:
            attention["q_proj"] = (query, hidden)
        else:
            rank = dim(args.q_lora_rank, "q_lora_rank")
            attention.update(q_a_proj=(rank, hidden), q_a_layernorm=(rank,), q_b_proj=(query, rank))
        attention.update(
            kv_a_proj_with_mqa=(dim(args.kv_lora_rank + args.qk_pos_emb_head_dim, "kv_lora_rank + qk_rope_head_dim"),
                                hidden),
            kv_a_layernorm=(latent,),
            kv_b_proj=(dim(heads * (args.qk_head_dim + args.v_head_dim),
                           "num_attention_heads x (qk_nope_head_dim + v_head_dim)"), latent),
            o_proj=(hidden, dim(heads * args.v_head_dim, "num_attention_heads x v_head_dim")))

    def gated(prefix: str, width: tuple[int, str]) -> dict:
        return {f"{prefix}.gate_proj.weight": (width, hidden), f"{prefix}.up_proj.weight": (width, hidden),
                f"{prefix}.down_proj.weight": (hidden, width)}

    from granular_moe.hf.targets import ffn_hidden_size

    experts = dim(args.num_experts or 0, _EXPERTS_KEY[target])
    expert_width = dim(args.moe_ffn_hidden_size or 0, "moe_intermediate_size")
    pattern = moe_pattern(args)
    for layer in range(args.num_layers):
        prefix = f"model.layers.{layer}."
        shapes[prefix + "input_layernorm.weight"] = (hidden,)
        shapes.update({f"{prefix}self_attn.{name}.weight": shape for name, shape in attention.items()})
        shapes[prefix + "post_attention_layernorm.weight"] = (hidden,)
        if not pattern[layer]:
            shapes.update(gated(prefix + "mlp", dim(ffn_hidden_size(args), "intermediate_size")))
            continue
        shapes[prefix + "mlp.gate.weight"] = (experts, hidden)
        if target == "deepseek_v3":
            shapes[prefix + "mlp.gate.e_score_correction_bias"] = (experts,)
        shapes.update(gated(f"{prefix}mlp.experts.{EXPERT}", expert_width))
        if target == "deepseek_v3":
            shapes.update(gated(prefix + "mlp.shared_experts", dim(args.moe_shared_expert_intermediate_size,
                                                                   "n_shared_experts x moe_intermediate_size")))
    shapes["model.norm.weight"] = (hidden,)
    if args.untie_embeddings_and_output_weights:
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def tensor_copies(name: str, args) -> int:
    """How many checkpoint tensors an entry of :func:`hf_tensor_shapes` stands for."""
    return args.num_experts if EXPERT in name else 1


def expanded(shapes: dict, args) -> dict:
    """:func:`hf_tensor_shapes` with one entry per routed expert: every tensor name of the checkpoint."""
    out = {}
    for name, shape in shapes.items():
        out.update({name.format(expert=expert): shape for expert in range(tensor_copies(name, args))}
                   if EXPERT in name else {name: shape})
    return out
