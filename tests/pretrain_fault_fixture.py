"""Entry module (``GRANULAR_MOE_ENTRY``) for the kill-and-resume test: the main job, every rank killed with
SIGKILL right after the optimizer step of iteration ``$KILL_AFTER_ITERATION`` (before it is logged or
saved): what a crashed node or an expired allocation does to a run."""

import os
import signal

from granular_moe.training import pretrain


def main(argv):
    kill_after, steps = int(os.environ["KILL_AFTER_ITERATION"]), [0]
    clear_tracker = pretrain.clear_aux_losses_tracker  # called once per iteration, after optimizer.step()

    def count_then_kill():
        clear_tracker()
        steps[0] += 1
        if steps[0] == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    pretrain.clear_aux_losses_tracker = count_then_kill
    return pretrain.main(argv)
