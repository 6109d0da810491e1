"""Started by torchrun in tests/test_distributed.py: ``python -m hdnas.search`` / ``hdnas.train``
(argv after the command name) with an optional fault (env ``DRIVER_FAULT``):

* ``stop=N``: stop after N steps without a final checkpoint (a kill between checkpoints);
* ``hang``: rank 1 stops answering at its second step (a hung rank);
* ``die``: rank 1 exits at its second step (a dead rank);
* ``desync``: rank 1 changes alpha after its first step (ranks out of sync).
"""
import functools
import os
import sys
import time

import torch

from hdnas import search, train
from hdnas.engine import loop as runs
from hdnas.engine.search import Search
from hdnas.engine.train import Train

fault = os.environ.get("DRIVER_FAULT", "")
rank = int(os.environ.get("RANK", "0"))
cmd, loop_cls = {"search": (search, Search), "train": (train, Train)}[sys.argv[1]]

if fault.startswith("stop="):
    runs.Loop.run = functools.partialmethod(runs.Loop.run, stop_after=int(fault[5:]))
elif fault in ("hang", "die") and rank == 1:
    original = loop_cls.train_step

    def faulty(self):
        if self.step == 1:
            if fault == "die":
                os._exit(3)
            time.sleep(600)
        return original(self)
    loop_cls.train_step = faulty
elif fault == "desync" and rank == 1:
    step = Search.train_step

    def perturbed(self):
        out = step(self)
        with torch.no_grad():
            self.model.alphas.add_(1e-3)
        return out
    Search.train_step = perturbed

sys.exit(cmd.main(sys.argv[2:]))
