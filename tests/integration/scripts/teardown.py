"""Start and end of the torchrun test scripts: stacks on demand, and an exit that cannot hang.

``destroy_process_group`` on gloo occasionally hangs (pytorch/pytorch#75097), and exiting with the
group alive can abort in interpreter finalization while gloo threads still hold tensors. Every
result is written before ``finish``; after a last barrier the process leaves without finalization.
"""

import faulthandler
import os
import signal
import sys

import torch.distributed as dist

# tests/testing_utils.py (torchrun) sends SIGUSR1 to a run that overstays, to see where each rank waits.
faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)


def finish() -> None:
    if dist.is_initialized():
        dist.barrier()  # every rank has written what it writes
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
