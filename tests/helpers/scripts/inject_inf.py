"""`pretrain` whose loss turns inf at backward call $INF_AT_BACKWARD (1-based, counted over micro-batches):
a non-finite gradient in the middle of healthy training, as a bf16 overflow or a bad batch would give."""

import os
import sys

from deepspeed.runtime.engine import DeepSpeedEngine

from pretrain.cli import main

_backward = DeepSpeedEngine.backward
_calls = 0


def backward_with_inf(self, loss, *args, **kwargs):
    global _calls
    _calls += 1
    if _calls == int(os.environ["INF_AT_BACKWARD"]):
        loss = loss * float("inf")
    return _backward(self, loss, *args, **kwargs)


DeepSpeedEngine.backward = backward_with_inf
sys.exit(main())
