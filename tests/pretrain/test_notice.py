"""`when_slow`: a set-up step says what it does once it has taken longer than the threshold, and only then."""

import time

from pretrain.notice import when_slow


def test_a_slow_step_is_said_once_and_a_fast_one_not_at_all(capsys):
    with when_slow("tokenizing the corpus", after=0.05):
        time.sleep(0.3)
    with when_slow("building the engine", after=0.5):
        pass
    with when_slow("on another rank", enabled=False, after=0.0):
        time.sleep(0.1)
    time.sleep(0.6)  # a cancelled timer would have fired by now
    assert capsys.readouterr().out == "pretrain: tokenizing the corpus ...\n"
