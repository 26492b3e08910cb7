"""Training: the loop and what it stands on (engine, distributed set-up, steps, validation, metrics, hooks).

DeepSpeed picks its accelerator when it is first imported: pretrain/train/distributed.py tells it to use the CPU on
a machine without CUDA (and quiets megatron-core's import warnings) before it imports DeepSpeed, so it is imported
first, whichever module of this package is asked for.
"""

from pretrain.train import distributed  # noqa: F401  (first: see above)
