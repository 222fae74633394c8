"""Binaries facing meaningless setups: one line naming the flag or file and what to do, no
traceback (a bug keeps its traceback); log lines outside the progress bars; answers as typed."""

import re
import types

import numpy as np
import pytest
from absl import flags

from jaxcircuits import logs
from jaxcircuits.reports.report import Report
from jaxcircuits.studies import kit, threshold_sweep
from jaxcircuits.weights.tokenize import load_tokenizer
from tests.conftest import SMOLLM2_GGUF, run_binary

WORKER = "tests.binary_worker"


def _one_line(r, binary: str) -> str:
    """The error line of a failed run, asserted to be its only stderr line."""
    assert r.returncode == 1, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{binary}: error: "), r.stderr[-2000:]
    return lines[0][len(f"{binary}: error: "):]


@pytest.mark.parametrize("fail,message", [
    ("locked", "/r/sweep is in use by another process (pid 7 on host); wait for it"),
    ("damaged", "/r/sweep/spec.json is damaged (checksum); delete the directory"),
    ("different", "/r/sweep holds a different sweep (differs in ['fingerprint.params'])"),
    ("memory", "one chunk of 1 subset needs 9 GiB of the device's 2 GiB"),
    ("missing", "/r/prompts.txt: No such file or directory"),
])
def test_expected_errors_end_a_binary_in_one_line(tmp_path, fail, message):
    r = run_binary(WORKER, f"--fail={fail}", f"--out={tmp_path / 'out'}")
    assert _one_line(r, "binary_worker") == message


def test_a_bug_keeps_its_traceback_and_the_switch_shows_every_one(tmp_path, monkeypatch):
    r = run_binary(WORKER, "--fail=bug", f"--out={tmp_path / 'out'}")
    assert r.returncode == 1 and "Traceback" in r.stderr and "KeyError: 'a bug'" in r.stderr
    monkeypatch.setenv("JAXCIRCUITS_TRACEBACK", "1")
    r = run_binary(WORKER, "--fail=locked", f"--out={tmp_path / 'out'}")
    assert r.returncode == 1 and "Traceback" in r.stderr and "LockedError: /r/sweep is in use" in r.stderr


@pytest.fixture
def answer_files(tmp_path):
    for name in ("source.txt", "target.txt"):
        (tmp_path / name).write_text("When Mary and John went to the store, John gave a drink to\n")
    return [f"--source_prompts={tmp_path / 'source.txt'}", f"--target_prompts={tmp_path / 'target.txt'}"]


@pytest.mark.parametrize("case", ["out_is_a_file", "out_under_a_file", "unknown_flag", "stray_argument",
                                  "equal_answers", "missing_model"])
def test_bad_setups_stop_before_the_model_in_one_line(tmp_path, answer_files, case):
    """Each refused before any model is read (--model does not exist, except where it is the point)."""
    file = tmp_path / "a_file"
    file.write_text("x")
    flags_, expected = {
        "out_is_a_file": ([f"--out={file}"], f"--out={file}: {file} cannot be a directory: {file} is a file; "
                                            "choose another --out"),
        "out_under_a_file": ([f"--out={file}/sub"], f"--out={file}/sub: {file}/sub cannot be a directory: {file} is a file"),
        "unknown_flag": (["--nosuchflag=1"], "Unknown command line flag 'nosuchflag'"),
        "stray_argument": (["--task=prompts", "Mary,"], "unexpected argument(s) ['Mary,']: flags are --name=value"),
        "equal_answers": (["--task=prompts", *answer_files, "--answers= Mary, Mary"],
                          "--answers=' Mary, Mary': needs two different non-empty answers"),
        "missing_model": ([f"--model={tmp_path / 'no_model'}"], str(tmp_path / "no_model")),
    }[case]
    model = [] if case == "missing_model" else ["--model=/does/not/exist"]
    line = _one_line(run_binary("experiments.threshold_sweep", *model, *flags_), "threshold_sweep")
    assert expected in line
    assert "/does/not/exist" not in line


def test_log_lines_clear_the_bar_and_progress_obeys_the_environment(tmp_path, monkeypatch):
    """absl's log line in the middle of a bar starts its own line (the bar cleared, then redrawn);
    JAXCIRCUITS_PROGRESS=0 turns a binary's bars off as it does the library's."""
    r = run_binary(WORKER, f"--out={tmp_path / 'out'}")
    assert r.returncode == 0 and "%|" in r.stderr, r.stderr[-2000:]
    assert re.search(r"(^|\n)W\d{4} [^\n]* LOGGED IN THE MIDDLE\n", r.stderr), repr(r.stderr)  # (\r read as \n)
    monkeypatch.setenv("JAXCIRCUITS_PROGRESS", "0")
    quiet = run_binary(WORKER, f"--out={tmp_path / 'out'}")
    assert quiet.returncode == 0 and "%|" not in quiet.stderr and "LOGGED IN THE MIDDLE" in quiet.stderr
    assert "%|" in run_binary(WORKER, "--progress", f"--out={tmp_path / 'out'}").stderr   # the flag still wins


def test_a_library_log_line_never_lands_inside_a_bar(capsys):
    import logging
    handler = logging.StreamHandler(__import__("sys").stderr)
    logging.getLogger().addHandler(handler)
    try:
        logs.quiet_handlers()
        with logs.progress(3, "bar") as bar:
            bar.update(1)
            logging.getLogger("jaxcircuits.test").warning("MIDDLE")
            bar.update(2)
    finally:
        logging.getLogger().removeHandler(handler)
    err = capsys.readouterr().err
    assert "MIDDLE\n" in err and re.search(r"(^|[\r\n])MIDDLE", err), repr(err)


def test_answers_keep_their_leading_space_through_the_flag():
    """absl list flags strip spaces (' Mary' -> 'Mary', another first token); --answers does not."""
    spec = dict(kit._flags(threshold_sweep.Options))["answers"]
    values = flags.FlagValues()
    getattr(flags, f"DEFINE_{spec.kind}")("answers", spec.default, spec.help, flag_values=values, **spec.define)
    values(["prog", "--answers= Mary, John"])
    assert spec.parse(values.answers) == (" Mary", " John")
    tok = load_tokenizer(SMOLLM2_GGUF)
    assert tok.encode(" Mary", False)[:1] != tok.encode("Mary", False)[:1]     # the space matters


def _prompt_task(tmp_path, answers):
    (tmp_path / "p.txt").write_text("Q: Which is bigger: 9.8 or 9.11?\\nA:\n")  # one prompt: \\n is a newline
    opts = threshold_sweep.Options(task="prompts", source_prompts=str(tmp_path / "p.txt"),
                                   target_prompts=str(tmp_path / "p.txt"), answers=answers)
    return kit.task_batches(types.SimpleNamespace(tokenizer=load_tokenizer(SMOLLM2_GGUF)), opts)


def test_answers_with_one_first_token_are_refused_naming_the_flag(tmp_path):
    """SmolLM2 splits digits: ' 9.8' and ' 9.11' both start with ' ', so the metric would be 0."""
    with pytest.raises(kit.OptionError, match=r"^--answers=' 9.8, 9.11': answers ' 9.8' and ' 9.11' share their "
                                              r"first token ' ' .* after prompt 0"):
        _prompt_task(tmp_path, (" 9.8", " 9.11"))
    task = _prompt_task(tmp_path, (" Mary", " John"))
    good, bad = np.asarray(task.metric.good), np.asarray(task.metric.bad)
    assert good.shape == (1, 1) and good[0, 0] != bad[0, 0]


def test_a_report_directory_that_is_a_file_is_named(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match=f"report cannot be a directory: {tmp_path / 'f'} is a file"):
        Report(str(tmp_path / "f" / "report"), "t")
