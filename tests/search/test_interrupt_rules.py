"""The interrupt rules of :mod:`autonorm.search._workers` that the worker and pool tests take
for granted: the first SIGINT/SIGTERM is kept and raised once, a second one only logs, and
which exceptions stand for an interrupt. Real signals sent to this process, no mocks."""

from __future__ import annotations

import importlib
import logging
import signal

import pytest

from autonorm.search import _workers as workers


@pytest.fixture(autouse=True)
def _no_signal_outlives_its_block():
    """A signal recorded inside a block is forgotten when the block ends (the raised
    Interrupted carries it): a later search in this process, in a thread where no block
    runs, must not read its errors as that interrupt."""
    yield
    assert workers.received_signal() is None
    assert workers.as_interrupt(SystemExit(1)) is None


def _send(signum: int) -> None:
    """Deliver ``signum`` to this process now (its handler runs before this returns)."""
    signal.raise_signal(signum)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_the_first_signal_is_raised_and_kept_a_second_only_logs(signum, caplog):
    caplog.set_level(logging.WARNING, logger=workers.__name__)
    with workers.handle_interrupts():
        assert workers.received_signal() is None
        with pytest.raises(workers.Interrupted) as err:
            _send(signum)
        _send(signal.SIGINT)  # the pool forwarding Ctrl-C again: no second raise
        assert workers.received_signal() == signum
        interrupt = workers.as_interrupt(RuntimeError("the trial's code failed meanwhile"))
    assert err.value.signum == signum
    assert str(err.value) == signal.Signals(signum).name
    assert err.value.exit_code == 128 + signum
    assert interrupt is not None and interrupt.signum == signum
    said = [r.getMessage() for r in caplog.records if r.name == workers.__name__]
    assert said == ["SIGINT received again: still shutting down"]


def test_a_fresh_block_forgets_the_signals_of_the_last_and_restores_the_handlers():
    previous = signal.getsignal(signal.SIGTERM)
    with workers.handle_interrupts(), pytest.raises(workers.Interrupted):
        _send(signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is previous
    with workers.handle_interrupts():
        assert workers.received_signal() is None
        assert workers.as_interrupt(RuntimeError("no signal")) is None


def test_an_unknown_signal_number_still_names_itself():
    assert str(workers.Interrupted(200)) == "signal 200"
    assert workers.Interrupted(200).exit_code == 328


@pytest.mark.parametrize(
    "module", ["lightning.pytorch.utilities.exceptions", "pytorch_lightning.utilities.exceptions"]
)
def test_lightnings_sigterm_exception_is_a_sigterm_interrupt(module):
    """Lightning turns SIGTERM into ``SIGTERMException`` (a SystemExit) inside ``fit``."""
    exceptions = importlib.import_module(module)
    interrupt = workers.as_interrupt(exceptions.SIGTERMException())
    assert interrupt is not None and interrupt.signum == signal.SIGTERM
    assert workers.as_interrupt(SystemExit(1)) is None  # the user's own sys.exit


def test_ctrl_c_is_a_sigint_interrupt_also_behind_lightnings_sys_exit():
    assert workers.as_interrupt(KeyboardInterrupt()).signum == signal.SIGINT
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise SystemExit(1)  # noqa: B904  (as Lightning's fit does, the context implicit)
    except SystemExit as err:
        interrupt = workers.as_interrupt(err)
    assert interrupt is not None and interrupt.signum == signal.SIGINT
    same = workers.Interrupted(signal.SIGTERM)
    assert workers.as_interrupt(same) is same
