"""A study binary on the kit whose run raises what --fail names, or else shows a progress bar with a
log line in its middle: python -m tests.binary_worker [--fail=NAME] [--out=DIR] (the default model's
config is read, no weights)."""

import dataclasses
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

from absl import logging  # noqa: E402

from jaxcircuits import logs, storage  # noqa: E402
from jaxcircuits.studies import kit  # noqa: E402

# --fail -> the error run raises (None: none; the report path is printed)
FAILURES = {
    "none": None,
    "locked": storage.LockedError("/r/sweep is in use by another process (pid 7 on host); wait for it"),
    "damaged": storage.DamagedFileError("/r/sweep/spec.json", "checksum", "delete the directory"),
    "different": ValueError("/r/sweep holds a different sweep (differs in ['fingerprint.params'])"),
    "memory": MemoryError("one chunk of 1 subset needs 9 GiB of the device's 2 GiB"),
    "missing": FileNotFoundError(2, "No such file or directory", "/r/prompts.txt"),
    "bug": KeyError("a bug"),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options(kit.StudyOptions):
    fail: str = kit.flag("enum", "none", "The error run raises.", enum_values=list(FAILURES))
    out: str = kit.out("worker")


def run(opts: Options) -> str:
    if FAILURES[opts.fail] is not None:
        raise FAILURES[opts.fail]
    with logs.progress(2, "worker", "step") as bar:
        bar.update(1)
        logging.warning("LOGGED IN THE MIDDLE")
        bar.update(1)
    return opts.out


kit.define_flags(Options)

if __name__ == "__main__":
    kit.run_binary(Options, run)
