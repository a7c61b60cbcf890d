"""DeepSpeed training runs of a tiny model with two GranularMoE layers, for the multi-process tests: the same seed, data
and global batch at any layout, so that every layout's losses and weights can be compared with one process's.

Run inside a gloo world (``distributed.run_distributed``): each run builds the model, calls ``deepspeed.initialize``
with the run's ZeRO stage and returns per-step losses (averaged over the data-parallel ranks, as the global batch's
loss), the final weights (experts by global index) and the expert biases; a run may save a DeepSpeed checkpoint
midway and resume from it in a fresh engine.
"""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # noqa: E402  (DeepSpeed reads it when first imported)

import torch
import torch.distributed as dist

HIDDEN, SEQ, MICRO_BATCH = 16, 6, 2
GLOBAL_MICRO_BATCHES = 8  # micro-batches per optimizer step over the whole world (data-parallel ranks x accumulation)


class TinyModel(torch.nn.Module):
    """Linear -> GranularMoE (softmax top-2, G 2, capacity drops, Switch loss) -> GranularMoE (sigmoid top-1, G 4,
    expert bias, group limit, gated shared expert) -> linear, a regression loss plus 0.01 l_aux."""

    def __init__(self, ep_size, dtype, ranks_per_node=None):
        from granular_moe.deepspeed import GranularMoE

        super().__init__()
        self.inp = torch.nn.Linear(HIDDEN, HIDDEN, dtype=dtype)
        self.moe1 = GranularMoE(HIDDEN, 32, num_experts=4, ep_size=ep_size, k=2, granularity=2, capacity_factor=1.0,
                                min_capacity=1, ranks_per_node=ranks_per_node, kernels="torch", params_dtype=dtype)
        self.moe2 = GranularMoE(HIDDEN, 32, num_experts=2, ep_size=ep_size, k=1, granularity=4, drop_tokens=False,
                                ranks_per_node=ranks_per_node,
                                score_function="sigmoid", expert_bias=True, bias_update_rate=1e-2, num_groups=2,
                                group_topk=1, shared_expert_size=8, shared_expert_gate=True,
                                aux_loss_type="seq_aux_loss", kernels="torch", params_dtype=dtype)
        self.out = torch.nn.Linear(HIDDEN, HIDDEN, dtype=dtype)

    def forward(self, x, y):
        h = self.inp(x)
        o1, l1, _ = self.moe1(h)
        h = h + o1
        o2, l2, _ = self.moe2(h)
        return torch.nn.functional.mse_loss(self.out(h + o2), y) + 0.01 * (l1 + l2)


def micro_batch(step, index, dtype):
    """The ``index``-th micro-batch of the global batch of optimizer step ``step`` (the same at every layout)."""
    generator = torch.Generator().manual_seed(1000 * step + index)
    x = torch.randn(MICRO_BATCH, SEQ, HIDDEN, generator=generator, dtype=torch.float64)
    return x.to(dtype), torch.tanh(x.flip(-1) * 2).to(dtype)


def ds_config(stage, gas, bf16=False):
    config = {"train_micro_batch_size_per_gpu": MICRO_BATCH, "gradient_accumulation_steps": gas,
              "gradient_clipping": 1.0, "zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 6,
              "wall_clock_breakdown": False}
    if bf16:
        config["bf16"] = {"enabled": True}
    return config


def build_engine(ep_size, stage, dtype, bf16=False, ranks_per_node=None):
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    torch.manual_seed(0)
    model = TinyModel(ep_size, dtype, ranks_per_node)
    groups = split_params_into_different_moe_groups_for_optimizer({"params": list(model.parameters()), "name": "all"})
    optimizer = torch.optim.Adam(groups, lr=1e-2)
    gas = GLOBAL_MICRO_BATCHES // dist.get_world_size()
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(stage, gas, bf16))
    return engine


def train(engine, first_step, steps, dtype, biases=None):
    """Optimizer steps ``first_step .. first_step + steps - 1``; the global batch's mean loss of each (and, in
    ``biases``, the second layer's expert bias after each)."""
    from granular_moe.deepspeed import update_expert_bias

    world, rank = dist.get_world_size(), dist.get_rank()
    gas = GLOBAL_MICRO_BATCHES // world
    losses = []
    for step in range(first_step, first_step + steps):
        total = torch.zeros((), dtype=torch.float64)
        for micro in range(gas):
            x, y = micro_batch(step, micro * world + rank, dtype)
            loss = engine(x, y)
            engine.backward(loss)
            total += loss.detach().double()
            if engine.is_gradient_accumulation_boundary():
                update_expert_bias(engine)
            engine.step()
        dist.all_reduce(total)
        losses.append(total.item() / GLOBAL_MICRO_BATCHES)
        if biases is not None:
            biases.append(engine.module.moe2.deepspeed_moe.router.expert_bias.clone())
    return losses


def weights(engine):
    """Every parameter by name (the experts' as ``{global index: tensor}``) and the expert biases, in float64."""
    found = {}
    for name, module in engine.module.named_modules():
        if hasattr(module, "deepspeed_moe"):
            experts = module.deepspeed_moe.experts
            ids = experts.global_expert_ids.tolist()
            for weight in ("weight1", "weight2"):
                found[f"{name}.{weight}"] = {i: getattr(experts, weight)[j].detach().double().clone()
                                              for j, i in enumerate(ids)}
            if module.deepspeed_moe.router.expert_bias is not None:
                found[f"{name}.expert_bias"] = module.deepspeed_moe.router.expert_bias.clone()
    for name, parameter in engine.module.named_parameters():
        if "experts.weight" not in name:
            found[name] = parameter.detach().double().clone()
    return found


def training_worker(rank, world_size, runs, checkpoint_root=None):
    """Each run, a dict: ``ep`` (expert-parallel size), ``stage`` (ZeRO), ``steps``; optional ``bf16`` (DeepSpeed's
    bf16 mode), ``resume_at`` (save a checkpoint after that many steps, train on, then load it into a fresh engine
    and train the same steps again), ``ranks_per_node`` (processes standing for a node: an expert-parallel group
    spanning several takes the two-level all-to-all), ``load_from`` (before training, load the module weights of run
    ``load_from``'s checkpoint, saved at another layout). Returns per run: ``nodes`` (spanned by an expert-parallel
    group), ``losses``, ``weights`` and, as they apply, ``biases``, ``saved_weights``, ``resumed_losses``,
    ``resumed_weights``, ``loaded_weights``. A run with ``refused`` returns the error ``deepspeed.initialize`` raises
    instead."""
    from granular_moe.deepspeed.groups import ensure_deepspeed_comm

    os.environ["LOCAL_RANK"] = str(rank)  # deepspeed.initialize asks for it (one node)
    ensure_deepspeed_comm()
    results = []
    for index, run in enumerate(runs):
        if run.get("refused"):
            results.append(initialize_error(run["ep"], run["stage"]))
            continue
        bf16 = run.get("bf16", False)
        dtype = torch.bfloat16 if bf16 else torch.float32
        engine = build_engine(run["ep"], run["stage"], torch.float32, bf16, run.get("ranks_per_node"))
        result = {"nodes": _nodes(run["ep"], run.get("ranks_per_node"))}
        steps, resume_at = run["steps"], run.get("resume_at")
        if "load_from" in run:
            engine.load_checkpoint(os.path.join(checkpoint_root, f"run{run['load_from']}"), tag="mid",
                                   load_module_only=True)
            result["loaded_weights"] = weights(engine)
        if resume_at is None:
            result["biases"] = []
            result["losses"] = train(engine, 0, steps, dtype, result["biases"])
        else:
            directory = os.path.join(checkpoint_root, f"run{index}")
            first = train(engine, 0, resume_at, dtype)
            engine.save_checkpoint(directory, tag="mid")
            result["saved_weights"] = weights(engine)
            result["losses"] = first + train(engine, resume_at, steps - resume_at, dtype)
            resumed = build_engine(run["ep"], run["stage"], torch.float32, bf16)
            resumed.load_checkpoint(directory, tag="mid")
            result["resumed_losses"] = train(resumed, resume_at, steps - resume_at, dtype)
            result["resumed_weights"] = weights(resumed)
        result["weights"] = weights(engine)
        results.append(result)
    return results


def _nodes(ep_size, ranks_per_node):
    from granular_moe.deepspeed.groups import expert_groups

    nodes = expert_groups(ep_size, ranks_per_node).nodes
    return 1 if nodes is None else nodes.nodes


def initialize_error(ep_size, stage):
    """The error ``deepspeed.initialize`` raises for the tiny model at ZeRO ``stage``, as text (None: none)."""
    try:
        build_engine(ep_size, stage, torch.float32)
    except Exception as error:  # noqa: BLE001  (the test reads which error it is)
        return f"{type(error).__name__}: {error}"
    return None
