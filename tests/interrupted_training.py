"""A training run killed part way, for the resume tests: the run stops as Ctrl-C or a killed job stops it,
leaving the checkpoints written so far and nothing of the step it was in."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

import chatglm_ft.train as train_module


@contextlib.contextmanager
def killed_in_step(step: int) -> Iterator[None]:
    """Within the block, training raises KeyboardInterrupt as optimizer step `step` (1-based) begins; the block
    must end with that interrupt. The real step comes back afterwards, so the next run resumes normally."""
    real_step = train_module.train_step

    def killed(run, *rest):
        if run.step == step - 1:  # run.step counts the steps already taken
            raise KeyboardInterrupt
        return real_step(run, *rest)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "train_step", killed)
        with pytest.raises(KeyboardInterrupt):
            yield
