"""Training: the loop and what it stands on (engine, distributed set-up, steps, validation, metrics, hooks).

DeepSpeed picks its accelerator when it is first imported: on a machine without CUDA it must be told to use the
CPU before any module of this package imports it, hence the call here.
"""

from pretrain.train.distributed import use_cpu_accelerator_without_gpu

use_cpu_accelerator_without_gpu()
