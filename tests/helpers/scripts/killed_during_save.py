"""`pretrain` that dies by SIGKILL in the middle of saving the checkpoint of step $KILL_AT_STEP.

DeepSpeed has written its files for that step, but our trainer state and `latest` are not yet written:
exactly the state a kill -9 (or a node failure) during a save leaves behind.
"""

import os
import signal
import sys

from deepspeed.runtime.engine import DeepSpeedEngine

from pretrain.cli import main

_save = DeepSpeedEngine.save_checkpoint


def save_then_die(self, save_dir, tag=None, *args, **kwargs):
    result = _save(self, save_dir, tag, *args, **kwargs)
    if tag == f"step_{int(os.environ['KILL_AT_STEP']):08d}":
        os.kill(os.getpid(), signal.SIGKILL)
    return result


DeepSpeedEngine.save_checkpoint = save_then_die
sys.exit(main())
