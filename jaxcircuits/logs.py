"""Quiet by default, visible when it matters: third-party log filtering and progress bars.

Importing jaxcircuits hides the INFO lines and warnings that third-party libraries log through
Python `logging` (orbax's checkpoint chatter and "No jax.Array in TypeHandlerRegistry", jax's
"Unable to initialize backend 'tpu'", ...): records below ERROR that installed packages (orbax,
jax, tensorstore, transformers, ...) log on their own loggers or absl's are dropped, except jax's
warnings (e.g. a GPU found without a CUDA jaxlib). jaxcircuits' own log lines, and the caller's,
are untouched.

Two switches, each an environment variable, a function and a flag of the binaries:

  third-party logs   JAXCIRCUITS_THIRD_PARTY_LOGS=1, `show_third_party(True)`, --third_party_logs
  progress bars      JAXCIRCUITS_PROGRESS=0,         `set_progress(False)`,    --noprogress

The flags' defaults are the environment variables, so a binary obeys them as the library does.

Progress bars are `tqdm.auto` bars (widgets in a notebook with ipywidgets, text on stderr elsewhere)
with rate and ETA, for sweeps, `run_masks` batches, blend searches and params conversion (`progress`); Hub
downloads show huggingface_hub's own bars, off with the others (`hub_tqdm_class`). Log lines
on the console (the root and third-party loggers' handlers writing to stdout or stderr, absl's
included) go through `tqdm.write`: an open bar is cleared, the line written, the bar redrawn, so a
line never lands inside a bar.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import site
import sys
import sysconfig

# Widget bars in a notebook when ipywidgets is there (tqdm.auto), else text bars everywhere: tqdm.auto
# without ipywidgets warns on import and falls back to text bars anyway.
if importlib.util.find_spec("ipywidgets") is not None:
    from tqdm.auto import tqdm
else:
    from tqdm import tqdm

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OURS = tuple(os.path.join(_ROOT, d) + os.sep for d in ("jaxcircuits", "experiments", "benchmarks"))
_INSTALLED = tuple({os.path.abspath(p) + os.sep for p in (*site.getsitepackages(), site.getusersitepackages(),
                                                         sysconfig.get_paths()["purelib"],
                                                         sysconfig.get_paths()["platlib"])})
# Loggers that third-party code writes to: absl's (orbax and other absl users) and the roots of
# libraries using plain `logging`.
_FILTERED = ("absl", "jax", "orbax", "tensorstore", "etils", "transformers", "huggingface_hub", "httpx",
             "httpx2", "httpcore", "httpcore2")
_state = {"third_party": os.environ.get("JAXCIRCUITS_THIRD_PARTY_LOGS", "0") not in ("", "0"),
          "progress": os.environ.get("JAXCIRCUITS_PROGRESS", "1") not in ("", "0")}


def _third_party(record: logging.LogRecord) -> bool:
    """Logged on one of `_FILTERED`'s loggers by code of an installed package other than ours (so a
    user's own absl or logging lines are never touched)."""
    path = os.path.abspath(record.pathname)
    return (record.name.split(".")[0] in _FILTERED and path.startswith(_INSTALLED)
            and not path.startswith(_OURS))


class _QuietThirdParty(logging.Filter):
    """Drops third-party records below ERROR (jax's below WARNING) unless third-party logs are on."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _state["third_party"] or record.levelno >= logging.ERROR or not _third_party(record):
            return True
        return record.name.split(".")[0] == "jax" and record.levelno >= logging.WARNING


_FILTER = _QuietThirdParty()


def _install() -> None:
    """Attach the filter to the third-party loggers (records logged on them) and to the handlers that
    records of their child loggers reach. Idempotent; `quiet_handlers` repeats the handler part after
    a framework (absl's `app.run`) installs its own."""
    for name in _FILTERED:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    quiet_handlers()


class _BarSafe:
    """A console stream (None: the current sys.stderr) whose writes clear and redraw the open progress
    bars (`tqdm.write`); equal to that stream (absl's handler compares its stream with sys.stderr)."""

    def __init__(self, stream=None):
        self._stream = stream

    @property
    def stream(self):
        return self._stream or sys.stderr

    def write(self, text: str) -> None:
        tqdm.write(text, file=self.stream, end="")

    def flush(self) -> None:
        self.stream.flush()

    def __eq__(self, other) -> bool:
        return other is self or other is self.stream

    __hash__ = object.__hash__


def quiet_handlers() -> None:
    """Filter every handler of the root and third-party loggers, and Python's last-resort handler;
    route those writing to the console (absl's through its Python handler) around the bars."""
    if logging.lastResort is not None and not isinstance(getattr(logging.lastResort, "stream", None), _BarSafe):
        logging.lastResort = logging.StreamHandler(_BarSafe())
        logging.lastResort.setLevel(logging.WARNING)
    handlers = [logging.lastResort, *(h for n in ("", *_FILTERED) for h in logging.getLogger(n).handlers)]
    for handler in filter(None, handlers):
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)
        console = getattr(handler, "python_handler", handler)             # absl's ABSLHandler wraps one
        stream = getattr(console, "stream", None)
        if isinstance(console, logging.StreamHandler) and not isinstance(stream, _BarSafe) \
                and any(stream is s for s in (sys.stdout, sys.stderr)):
            console.setStream(_BarSafe(stream))


def show_third_party(on: bool = True) -> None:
    """Show (True) or hide (False, the default) third-party INFO lines and warnings."""
    _state["third_party"] = bool(on)


def set_progress(on: bool) -> None:
    """Turn progress bars on (the default) or off."""
    _state["progress"] = bool(on)


def progress(total=None, desc: str = "", unit: str = "it", initial: int = 0, leave: bool = True,
             disable: bool = False, **kw) -> tqdm:
    """A `tqdm.auto` bar (rate and ETA), also disabled when progress bars are off; use it as a
    context manager, `.update(n)` it. kw go to tqdm."""
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, leave=leave,
                disable=disable or not _state["progress"], dynamic_ncols=True, **kw)


class _Silent(tqdm):
    """A bar that never shows."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **{**kw, "disable": True})


def hub_tqdm_class():
    """huggingface_hub's `tqdm_class` for downloads: None (its own bars, which also obey
    HF_HUB_DISABLE_PROGRESS_BARS) while progress bars are on, else a silent one."""
    return None if _state["progress"] else _Silent


def define_flags() -> None:
    """Define --progress and --third_party_logs for an absl binary (call at module level)."""
    from absl import flags
    flags.DEFINE_bool("progress", _state["progress"], "Show progress bars (tqdm) with rate and ETA on stderr "
                      "(default: on unless JAXCIRCUITS_PROGRESS=0).")
    flags.DEFINE_bool("third_party_logs", _state["third_party"], "Show third-party INFO lines and warnings "
                      "(orbax, jax, absl), hidden by default (JAXCIRCUITS_THIRD_PARTY_LOGS=1 shows them).")


def apply_flags() -> None:
    """Apply --progress and --third_party_logs (call first in an absl binary's main)."""
    from absl import flags
    set_progress(flags.FLAGS.progress)
    show_third_party(flags.FLAGS.third_party_logs)
    quiet_handlers()


_install()
