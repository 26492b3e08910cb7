"""Training: the loop and what it stands on (engine, distributed set-up, steps, validation, metrics, hooks).

DeepSpeed picks its accelerator when it is first imported: pretrain/train/distributed.py, which every module here
stands on, tells it to use the CPU on a machine without CUDA before it imports DeepSpeed.
"""
