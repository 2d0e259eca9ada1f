"""Lightning's progress bar, on stderr: stdout carries a command's results alone.

Lightning's own TQDMProgressBar writes to stdout, so a redirected `funnel fit > out.json` used to
fill the file with carriage-return updates. funnel replaces it with the same bar on stderr, and
leaves it out under `-q` unless the config sets ``trainer.enable_progress_bar`` itself.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Iterator
from typing import Any

from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.callbacks.progress.tqdm_progress import Tqdm

from funnel.spec import Config

# set by `funnel -q`: no bar unless the config asks for one
_QUIET: contextvars.ContextVar[bool] = contextvars.ContextVar("funnel_quiet_progress", default=False)


@contextlib.contextmanager
def quiet_progress(quiet: bool = True) -> Iterator[None]:
    """Runs trained in this block show no progress bar unless their config enables it."""
    token = _QUIET.set(quiet)
    try:
        yield
    finally:
        _QUIET.reset(token)


def show_progress(cfg: Config) -> bool:
    """``trainer.enable_progress_bar`` when the config gives it, else on (off under ``-q``)."""
    given = cfg.trainer.kwargs.get("enable_progress_bar")
    return bool(given) if given is not None else not _QUIET.get()


class StderrProgressBar(TQDMProgressBar):
    """Lightning's TQDMProgressBar, written to stderr instead of stdout."""

    def _bar(self, desc: str, position: int, leave: bool, **options: Any) -> Tqdm:
        return Tqdm(
            desc=desc,
            position=position,
            disable=self.is_disabled,
            leave=leave,
            dynamic_ncols=True,
            file=sys.stderr,  # looked up now: a redirected or captured stderr receives the bar
            bar_format=self.BAR_FORMAT,
            **options,
        )

    def init_sanity_tqdm(self) -> Tqdm:
        return self._bar(self.sanity_check_description, 2 * self.process_position, leave=False)

    def init_train_tqdm(self) -> Tqdm:
        return self._bar(self.train_description, 2 * self.process_position, leave=True, smoothing=0)

    def init_predict_tqdm(self) -> Tqdm:
        return self._bar(self.predict_description, 2 * self.process_position, leave=True, smoothing=0)

    def init_validation_tqdm(self) -> Tqdm:
        has_main_bar = self.trainer.state.fn != "validate"  # (no training bar under trainer.validate)
        return self._bar(self.validation_description, 2 * self.process_position + has_main_bar, leave=not has_main_bar)

    def init_test_tqdm(self) -> Tqdm:
        return self._bar("Testing", 2 * self.process_position, leave=True)
