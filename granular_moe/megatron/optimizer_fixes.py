"""Fixes for megatron-core 0.19's distributed optimizer with torch's Adam (no Apex or Transformer Engine).

Without Apex or Transformer Engine, megatron-core's optimizers are torch's Adam, which keeps a per-parameter
``step`` tensor in its state. Loading a distributed-optimizer checkpoint goes wrong twice there, on a GPU or
not:

1. ``load_parameter_state_from_fully_reshardable`` hands ``_set_main_param_and_optimizer_states`` every
   state tensor but ``step`` (restored separately from the parameter groups), and that method looks ``step``
   up among them: ``KeyError: 'step'``, so no resharded checkpoint resumes. The fix makes it skip the states
   it is not given, as its own code does for entries that are not tensors.
2. ``DistributedOptimizer.load_state_dict`` restores ``step`` as one tensor shared by every parameter's
   state; torch's Adam increments each parameter's ``step`` in place, so after one more update the shared
   count has grown by the number of parameters and Adam's bias correction is wrong from then on (the resumed
   run leaves the loss curve of the uninterrupted one). The fix gives every parameter its own copy.
"""

from __future__ import annotations

import functools


class _GivenStates(dict):
    """The states a checkpoint provides; a state it does not provide reads as None (skipped by the
    method, which copies tensors only)."""

    def __missing__(self, key):
        return None


def _skipping_absent_states(set_states):
    @functools.wraps(set_states)
    def set_given_states(self, model_param, tensors):
        return set_states(self, model_param, _GivenStates(tensors))

    set_given_states.granular_moe_fix_of = set_states
    return set_given_states


def _separate_steps(load_state_dict):
    @functools.wraps(load_state_dict)
    def load_with_own_steps(self, state_dict):
        result = load_state_dict(self, state_dict)
        for state in self.optimizer.state.values():
            if "step" in state and hasattr(state["step"], "clone"):
                state["step"] = state["step"].clone()
        return result

    load_with_own_steps.granular_moe_fix_of = load_state_dict
    return load_with_own_steps


def apply_optimizer_fixes() -> bool:
    """Apply the fixes where megatron-core uses torch's Adam (no Apex or Transformer Engine); returns whether
    they are in place. Idempotent."""
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return False
    optimizer_class = distrib_optimizer.DistributedOptimizer
    for name, fix in (("_set_main_param_and_optimizer_states", _skipping_absent_states),
                      ("load_state_dict", _separate_steps)):
        method = getattr(optimizer_class, name)
        if not hasattr(method, "granular_moe_fix_of"):
            setattr(optimizer_class, name, fix(method))
    return True
