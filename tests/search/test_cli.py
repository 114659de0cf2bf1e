"""The `embsize` command end to end, in subprocesses, as a user runs it."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from search.cli import main

from .tables import read_table


def run(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "search.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_cli_help_is_fast_and_lists_commands(tmp_path):
    p = run(["--help"], tmp_path)
    assert p.returncode == 0
    assert "search" in p.stdout and "train" in p.stdout


def test_cli_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["search", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "in addition) (default 24)" in text and "per trial (default 10)" in text
    assert "(default None)" not in text and "(default False)" not in text
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "MLP dropout (default 0.0)" in text and "(default 0.003)" in text  # zero is a default worth saying


def test_cli_train_end_to_end(tmp_path):
    p = run(["train", "--rows", "6000", "--dims", "user_id=4,book_id=4", "--default-dim", "2", "--epochs", "2"], tmp_path)
    assert p.returncode == 0, p.stderr
    assert "epoch   2" in p.stdout and "test AUC" in p.stdout
    assert "user_id=4" in p.stdout and "genre=2" in p.stdout


@pytest.mark.slow
def test_cli_search_end_to_end(tmp_path):
    command = ["search", "--rows", "8000", "--trials", "4", "--max-epochs", "2", "--name", "cli", "--num-cpus", "2"]
    p = run(command, tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    out = tmp_path / "embsize-out" / "cli"
    recipe = yaml.safe_load((out / "recommended.yaml").read_text())
    assert set(recipe["model"]["dims"]) == {"user_id", "book_id", "genre", "tags", "shelf"}
    assert "recommended config:" in p.stdout and "hypervolume" in p.stdout
    assert "Token authentication" not in p.stderr  # Ray's warning on every local start
    # MLflow's new-store and Optuna's new-study INFO lines, in formats of their own, among the CLI's start lines
    assert "database tables" not in p.stderr + p.stdout and "A new study created" not in p.stderr + p.stdout
    assert (tmp_path / "mlruns" / "mlflow.db").is_file()  # the embedded default store
    front = read_table(out / "front.csv")
    assert front["recommended"].sum() == 1
    # the pick is named as the MLflow UI lists its run, with Ray's trial id; the front's rows by their runs' names
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    (pick,) = c.search_runs([e.experiment_id for e in c.search_experiments()], "tags.recommended = 'true'")
    assert f"recommended: {pick.info.run_name} (Ray trial {pick.data.tags['trial_id']})  val AUC" in p.stdout
    names = {r.data.tags["trial_id"]: r.info.run_name
             for r in c.search_runs([pick.info.experiment_id], "tags.trial_id != ''")}
    assert front["run_name"].tolist() == [names[t] for t in front["trial_id"]]
    # ... and each finished trial's progress line names its run too
    progress = re.findall(r"<- (\S+) \((\w+)\) (completed|stopped_early|failed)", p.stdout)
    assert len(progress) == len(names) and all(names[trial] == run for run, trial, _ in progress), p.stdout
    table = p.stdout.split("Pareto front and heuristic baselines")[1].split("recommended:")[0].strip().splitlines()
    assert table[1].split()[-1] == "run" and [ln.split()[-1] for ln in table[2:]] == front["run_name"].tolist()
    # the same command again: the search has ended, so it says so, trains nothing and prints the same pick
    again = run(command, tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"search 'cli' in {out} has ended" in again.stdout and "continuing search" not in again.stdout
    assert not re.findall(r"<- (\S+) \((\w+)\) (completed|stopped_early|failed)", again.stdout), again.stdout
    pick_line = next(ln for ln in p.stdout.splitlines() if ln.startswith("recommended: "))
    assert pick_line in again.stdout.splitlines()


def test_cli_multi_column_joins_the_features(tmp_path):
    from search.cli import _raw, build_parser

    path = tmp_path / "events.csv"
    pd.DataFrame({"user": ["u1", "u2", "u3", "u4"] * 5, "tags": ["a|b", "b", "c|a|d", "d"] * 5,
                  "y": [0, 1] * 10}).to_csv(path, index=False)
    args = build_parser().parse_args(["train", "--data", str(path), "--label", "y", "--features", "user",
                                      "--multi", "tags"])
    raw = _raw(args)
    assert [(f.name, f.multi) for f in raw.features] == [("user", False), ("tags", True)]
    listed = build_parser().parse_args(["train", "--data", str(path), "--label", "y", "--features", "tags,user",
                                        "--multi", "tags"])
    assert [(f.name, f.multi) for f in _raw(listed).features] == [("tags", True), ("user", False)]


def test_cli_train_padded_csv_cells_are_one_category(tmp_path, monkeypatch, capsys):
    path = tmp_path / "padded.csv"
    pd.DataFrame({"item": [" 5", "5 ", "5", "7", " 7 ", "   "] * 20, "user": ["u1", "u2", "u3"] * 40,
                  "y": [0, 1, 1, 0] * 30}).to_csv(path, index=False)
    monkeypatch.chdir(tmp_path)
    code = main(["train", "--data", str(path), "--label", "y", "--features", "item,user", "--epochs", "1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "cardinalities item=3, user=4" in out  # '5' and '7' plus the unknown bucket ('   ' is missing)


def test_train_on_a_table_of_100k_rows_suggests_sparse_gradients_and_not_when_given(tmp_path, monkeypatch, capsys):
    """Dense Adam updates a whole table each step: on a 100k-row table --sparse trains several times faster
    (pipelines/train.py SPARSE_HINT_ROWS). The note names the feature and its categories; --sparse, or small tables,
    print none."""
    import numpy as np

    rng = np.random.default_rng(0)
    n = 130_000
    path = tmp_path / "wide.parquet"
    pd.DataFrame({"user": rng.permutation(n).astype(str), "city": rng.integers(0, 50, n).astype(str),
                  "y": rng.integers(0, 2, n)}).to_parquet(path)
    monkeypatch.chdir(tmp_path)
    base = ["train", "--data", str(path), "--label", "y", "--features", "user,city", "--epochs", "1",
            "--default-dim", "2", "--hidden", "4"]
    assert main(base) == 0
    out = capsys.readouterr().out
    users = int(re.search(r"user=(\d+)", out).group(1))
    assert users >= 100_000  # the training split's users, plus the unknown bucket
    assert f"note: feature 'user' has {users:,} categories" in out and "--sparse" in out
    assert main([*base, "--sparse"]) == 0
    assert "note:" not in capsys.readouterr().out
    assert main([*base[:6], "city", *base[7:]]) == 0  # 51 categories
    assert "note:" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--data", "nope.csv"], "does not exist"),
        (["train", "--data", "{csv}", "--label", "y", "--features", "a,zzz"], "zzz"),
        (["train", "--data", "{csv}", "--label", "nolabel", "--features", "a"], "nolabel"),
        (["train", "--data", "{txt}", "--label", "y", "--features", "a"], ".txt"),
        (["train", "--data", "{const}", "--label", "y", "--features", "a"], "constant"),
        (["train", "--data", "{rating}", "--label", "r", "--features", "a"], "threshold"),
        (["train", "--rows", "2000", "--dims", "user_id=0"], "must be >= 1"),
        (["train", "--rows", "2000", "--dims", "user_id=abc"], "must be an integer"),
        (["train", "--rows", "2000", "--dims", "nosuch=4"], "unknown feature 'nosuch'"),
        (["train", "--rows", "2000", "--threads", "-2"], "--threads is -2, but must be >= 1"),
        (["train", "--rows", "2000", "--threads", "0"], "--threads is 0, but must be >= 1"),
        (["train", "--rows", "2000", "--epochs", "0"], "--epochs is 0, but must be >= 1"),
        (["train", "--rows", "2000", "--batch-size", "0"], "--batch-size is 0"),
        (["train", "--rows", "2000", "--patience", "-1"], "--patience is -1"),
        (["train", "--rows", "2000", "--lr", "nan"], "--lr is nan, but must be > 0"),
        (["train", "--rows", "2000", "--dropout", "1.5"], "--dropout is 1.5, but must be in [0, 1)"),
        (["train", "--config", "missing.yaml", "--threads", "-1"], "--threads is -1"),
        (["search", "--trials", "0"], "--trials"),
        (["search", "--scheduler", "magic"], "invalid choice"),
        (["search", "--rows", "2000", "--memory-budget", "10"], "smallest model"),
        (["search", "--memory-budget", "lots"], "memory budget"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_cli_bad_input_one_line_exit_2(args, message, tmp_path, monkeypatch, capsys):
    """In-process through the CLI's main() (same code path as the console script, without a process per case)."""
    csv = tmp_path / "t.csv"
    pd.DataFrame({"a": ["x", "y", "z", "x"] * 5, "y": [0, 1] * 10, "r": [1, 2, 3, 4, 5] * 4}).to_csv(csv, index=False)
    const = tmp_path / "c.csv"
    pd.DataFrame({"a": ["x", "y"] * 5, "y": [1] * 10}).to_csv(const, index=False)
    (tmp_path / "t.txt").write_text("hello")
    subst = {"{csv}": str(csv), "{txt}": str(tmp_path / "t.txt"), "{const}": str(const), "{rating}": str(csv)}
    args = [subst.get(a, a) for a in args]
    before = set(tmp_path.rglob("*"))
    monkeypatch.chdir(tmp_path)
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("embsize: error:"), err
    assert message in lines[0]
    assert set(tmp_path.rglob("*")) == before  # nothing written


def test_cli_bad_input_in_a_real_process(tmp_path):
    p = run(["train", "--rows", "2000", "--dims", "user_id=0"], tmp_path)
    assert p.returncode == 2
    assert p.stderr.strip() == "embsize: error: dim for 'user_id' is 0, but must be >= 1"


def test_cli_epsilon_help_says_what_it_does_under_knee(monkeypatch, capsys):
    """--knee --epsilon is no bad combination: a front without a knee falls back to the epsilon rule, and confirm
    --refine takes the search's epsilon as its tolerance under any rule; the help says so."""
    monkeypatch.setenv("COLUMNS", "1000")  # one line per option: argparse wraps at hyphens
    with pytest.raises(SystemExit):
        main(["search", "--help"])
    epsilon = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("--epsilon"))
    assert "with --knee, " in epsilon and "--refine-tolerance" in epsilon


@pytest.mark.slow
def test_cli_a_search_running_in_another_process_is_not_continued(tmp_path):
    import time

    from mlflow.tracking import MlflowClient

    args = ["search", "--rows", "6000", "--trials", "3", "--max-epochs", "2", "--no-heuristics", "--name", "twice",
            "--num-cpus", "2"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    first = subprocess.Popen([sys.executable, "-m", "search.cli", *args], cwd=tmp_path, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = tmp_path / "embsize-out" / "twice"
    deadline = time.monotonic() + 120
    while not ((out / "search.json").is_file() and (out / ".running.lock").is_file()) and first.poll() is None:
        assert time.monotonic() < deadline, "the first search never started"
        time.sleep(0.2)
    state = (out / "search.json").read_text()
    second = run(args, tmp_path)  # the same search again (as --resume twice would), while the first runs
    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-2000:]
    if second.returncode == 0:
        pytest.skip("the first search ended before the second started (a slow machine); nothing was run twice")
    assert second.returncode == 2
    assert second.stderr.strip().splitlines() == [
        f"embsize: error: search 'twice' is running in another process now (it holds '{out / '.running.lock'}'); "
        "wait for it to end or stop it, or give this search another --name"
    ]
    assert (out / "search.json").read_text() == state
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    exp = c.get_experiment_by_name("embsize")
    (parent,) = c.search_runs([exp.experiment_id], filter_string="tags.`embsize.kind` = 'search'")
    trials = c.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert parent.info.status == "FINISHED" and len(trials) == 3  # the first search's own trials, no one else's


def test_cli_searches_started_in_the_same_second_get_their_own_names(tmp_path, monkeypatch):
    # the dated default name of a search that a script starts beside another: never the other search's folder
    import time

    from search import cli

    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20261202-101010")
    taken = tmp_path / "embsize-out" / "synthetic-20261202-101010"
    taken.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    seen = {}

    def fake_run_search(data, space, settings, info, on_event=None, command=None, fresh=False):
        seen.update(name=settings.name, fresh=fresh, command=command["name"])
        raise cli.UsageError("stop here")  # argument handling only: no search runs

    monkeypatch.setattr("search.runner.run_search", fake_run_search)
    assert cli.main(["search", "--rows", "500", "--trials", "1"]) == 2
    assert seen == {"name": "synthetic-20261202-101010-2", "fresh": True, "command": "synthetic-20261202-101010-2"}


def test_cli_a_dated_name_taken_at_the_last_moment_moves_on(tmp_path, monkeypatch, capsys):
    # another search claimed the same dated name between the choice and run_search's claim: the next name is used
    import time

    from search import cli
    from search.resume import NameTaken

    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20261202-101010")
    monkeypatch.chdir(tmp_path)
    calls = []

    def fake_run_search(data, space, settings, info, on_event=None, command=None, fresh=False):
        calls.append((settings.name, command["name"], fresh))
        if len(calls) == 1:
            (tmp_path / "embsize-out" / settings.name).mkdir(parents=True)  # what the other search did
            raise NameTaken(f"search name '{settings.name}' is taken")
        raise cli.UsageError("stop here")

    monkeypatch.setattr("search.runner.run_search", fake_run_search)
    assert cli.main(["search", "--rows", "500", "--trials", "1"]) == 2
    assert calls == [("synthetic-20261202-101010", "synthetic-20261202-101010", True),
                     ("synthetic-20261202-101010-2", "synthetic-20261202-101010-2", True)]
    assert "this one is 'synthetic-20261202-101010-2'" in capsys.readouterr().out
    calls.clear()  # with --name the user chose the name: no other is tried, and the search must not be fresh
    assert cli.main(["search", "--rows", "500", "--trials", "1", "--name", "mine"]) == 2
    assert calls == [("mine", "mine", False)]


def test_sigterm_is_taken_as_ctrl_c_so_an_open_mlflow_run_is_closed(tmp_path, capsys):
    # `kill`, `timeout` and `docker stop` send SIGTERM, whose default ends the process on the spot: `embsize train
    # --config` left its MLflow run RUNNING. The CLI takes it as Ctrl-C, which unwinds through MLflow's run context.
    import signal
    import time

    import mlflow
    from mlflow.tracking import MlflowClient

    from search import runner

    previous, uri = signal.getsignal(signal.SIGTERM), mlflow.get_tracking_uri()
    sigint = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a fresh `embsize` process
    try:
        assert main(["report", "no-such-search", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]) == 2
        assert signal.getsignal(signal.SIGTERM) is not previous  # installed by the CLI before the command runs
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'm.db'}")
        exp_id = MlflowClient().create_experiment("sigterm")  # explicit: the fluent API keeps an earlier test's
        with pytest.raises(KeyboardInterrupt):
            with mlflow.start_run(experiment_id=exp_id) as run:
                signal.raise_signal(signal.SIGTERM)
                time.sleep(5)  # Python runs the handler between bytecodes: the sleep is interrupted at once
        assert MlflowClient().get_run(run.info.run_id).info.status in ("KILLED", "FAILED")  # not RUNNING
        assert runner.terminated()
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, sigint)
        mlflow.set_tracking_uri(uri)
        runner._TERMINATED.clear()


def test_ctrl_c_while_torch_is_imported_ends_with_one_line(tmp_path):
    """A Ctrl-C in the first second of `embsize search` lands inside `import torch`. The CLI's handler then imported
    the runner to ask whether it was a SIGTERM, importing the half-imported torch again: a traceback ("partially
    initialized module 'torch'", "Only a single TORCH_LIBRARY") or a segfault. The Ctrl-C is raised here by an import
    hook at a module deep inside torch's import, once, where a real one lands at random."""
    hook = (
        "import sys\n"
        "class CtrlC:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch._prims':\n"
        "            sys.meta_path.remove(self)\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, CtrlC())\n"
        "from search.cli import main\n"
        "sys.exit(main(['search', '--trials', '2']))\n"
    )
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("MLFLOW_TRACKING_URI", None)
    p = subprocess.run([sys.executable, "-c", hook], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 130, p.stderr
    assert p.stderr.strip() == "embsize: interrupted"
    assert not (tmp_path / "embsize-out").exists() and not (tmp_path / "mlruns").exists()


@pytest.mark.slow
def test_ctrl_c_after_the_result_leaves_a_finished_search_finished(tmp_path):
    """After the last line the process still shuts its local Ray down (~3 s, Ray's atexit hook). A Ctrl-C there printed
    "Exception ignored in atexit callback" with a traceback, or ended the finished search with status 130."""
    import signal
    import time

    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    args = ["search", "--rows", "3000", "--trials", "2", "--max-epochs", "1", "--num-cpus", "2", "--no-heuristics"]
    p = subprocess.Popen([sys.executable, "-m", "search.cli", *args], cwd=tmp_path, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for line in p.stdout:
            if line.startswith("recommended config:"):
                break
        sent = 0
        for _ in range(6):  # over the next ~1.5 s: into Ray's shutdown
            time.sleep(0.25)
            if p.poll() is not None:
                break
            p.send_signal(signal.SIGINT)
            sent += 1
        _, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert sent, "the process ended before a Ctrl-C was sent: nothing was tested"
    assert p.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]
    assert line.startswith("recommended config:") and Path(line.split(": ", 1)[1].strip()).is_file()


@pytest.mark.slow
def test_a_search_piped_into_a_reader_that_leaves_early_finishes_its_work(tmp_path):
    """`embsize search | head -2`, or a pager quit early: the search's next progress line met a closed pipe and the
    search ended in a BrokenPipeError traceback, exit 1, with no result written."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    args = ["search", "--rows", "3000", "--trials", "2", "--max-epochs", "1", "--num-cpus", "2", "--no-heuristics",
            "--name", "piped"]
    p = subprocess.Popen([sys.executable, "-m", "search.cli", *args], cwd=tmp_path, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = p.stdout.readline()  # "data: synthetic", before Ray starts; the progress comes seconds later
        p.stdout.close()  # the reader leaves
        _, err = p.communicate(timeout=300)
    finally:
        p.kill()
    assert first.startswith("data:"), first
    assert p.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "BrokenPipe" not in err, err[-3000:]
    assert (tmp_path / "embsize-out" / "piped" / "recommended.yaml").is_file()
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    (parent,) = c.search_runs([e.experiment_id for e in c.search_experiments()],
                              "tags.`embsize.kind` = 'search' and tags.`embsize.name` = 'piped'")
    assert parent.info.status == "FINISHED"


@pytest.mark.slow
def test_search_then_report_and_confirm_as_commands_each_exit_when_done_beside_the_search(tmp_path):
    """The console commands end: `embsize confirm` with baselines on the front once hung at its exit, joining the
    idle worker of the pool MLflow's artifact downloads keep (the in-process tests call ``main``, never the exit).
    Run from another directory than the search's, report/ and confirm/ go into the search's --output-dir folder
    (where recommended.yaml is), not into a new ./embsize-out there."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    work, elsewhere, uri = tmp_path / "work", tmp_path / "elsewhere", f"sqlite:///{tmp_path / 'mlflow.db'}"
    work.mkdir(), elsewhere.mkdir()
    search = ["search", "--rows", "3000", "--trials", "2", "--max-epochs", "1", "--num-cpus", "2", "--name", "done",
              "--output-dir", str(tmp_path / "results")]
    for cwd, args in ((work, search), (elsewhere, ["report", "done", "--no-log"]),
                      (elsewhere, ["confirm", "done", "--seeds", "2", "--workers", "1"])):
        p = subprocess.run([sys.executable, "-m", "search.cli", *args, "--tracking-uri", uri], cwd=cwd, env=env,
                           text=True, capture_output=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "results" / "done" / "report" / "pareto.png").is_file()
    assert (tmp_path / "results" / "done" / "confirm" / "confirmed.yaml").is_file()
    assert not (elsewhere / "embsize-out").exists()


def test_python_dash_m_search_cli_reports_a_bad_value_raised_in_another_module_in_one_line(tmp_path):
    """`python -m search.cli` runs cli.py as __main__, beside the search.cli the other modules import: a UsageError
    raised in cli_review was not the class main() caught there, and a bad value gave a traceback, exit 1."""
    p = subprocess.run([sys.executable, "-m", "search.cli", "confirm", "any", "--seeds", "1"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-3000:]
    assert p.stderr.strip() == "embsize: error: --seeds is 1, but must be >= 2 (one seed has no spread)"
    assert not list(tmp_path.iterdir())


def test_the_commands_exit_runs_the_atexit_handlers_and_waits_for_threads_but_skips_pythons_teardown(tmp_path):
    """``exit_now`` is Python's exit less its module teardown (1.2-1.5 s after a search): what an exit must do still
    happens, and the exit code is kept."""
    code = f"""
import atexit, threading, time
from pathlib import Path
from search.cli import exit_now

out = Path({str(tmp_path)!r})
atexit.register(lambda: (out / "atexit").write_text("ran"))
threading.Thread(target=lambda: (time.sleep(0.3), (out / "thread").write_text("joined"))).start()
class Teardown:
    def __del__(self):
        (out / "teardown").write_text("ran")
keep = Teardown()
print("buffered, not yet flushed", end="")
exit_now(3)
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 3, p.stderr
    assert p.stdout == "buffered, not yet flushed"
    assert (tmp_path / "atexit").read_text() == "ran" and (tmp_path / "thread").read_text() == "joined"
    assert not (tmp_path / "teardown").exists()  # a module global's finalizer: the teardown that is skipped


def test_the_commands_exit_does_not_wait_forever_on_an_idle_executor_worker(tmp_path):
    """An idle ThreadPoolExecutor worker (MLflow's artifact repositories keep one) is a thread that is not a daemon and
    ends only when threading's exit hooks tell it to: joining it without them hung `embsize confirm` at its exit."""
    code = f"""
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from search.cli import exit_now

pool = ThreadPoolExecutor(1)
pool.submit(lambda: None).result()  # its worker now idles, waiting for more work
pool.submit(lambda: __import__("time").sleep(0.3) or Path({str(tmp_path)!r}, "task").write_text("done"))
exit_now(4)
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 4, p.stderr
    assert (tmp_path / "task").read_text() == "done"  # work already handed to the pool still ends first, as at exit


def test_a_pin_above_a_features_categories_is_kept_and_said():
    """`features: {region: 9}` for a region with fewer categories: the pin holds (a pin may match a production model),
    and the search says that the dims above the categories learn nothing; pins within them and the space's own
    pins (a feature with one possible dim) say nothing."""
    from pipelines import prepare
    from pipelines.synthetic import SyntheticSpec, generate
    from search.cli import _pin_notes
    from search.space import FeatureSpec, SearchSpec, build_space

    data = prepare(generate(SyntheticSpec(rows=3000)))
    small = min(data.features, key=lambda f: f.cardinality)
    n = small.cardinality - 1
    over = build_space(data.features, SearchSpec(features={small.name: FeatureSpec(pin=n + 5)}))
    assert over.pins[small.name] == n + 5
    (note,) = _pin_notes(data, over)
    assert f"pins {small.name} at dim {n + 5}, above its {n} categories" in note
    assert _pin_notes(data, build_space(data.features, SearchSpec(features={small.name: FeatureSpec(pin=n)}))) == []
    assert _pin_notes(data, build_space(data.features)) == []


def test_cli_budget_note_names_the_baselines_the_budget_keeps_out():
    """Under --memory-budget the over-budget baselines are not trained; the search says so before it starts, since
    the result table ("Pareto front and heuristic baselines") then shows none of them."""
    from pipelines import prepare
    from pipelines.synthetic import SyntheticSpec, generate
    from search.cli import _budget_note
    from search.heuristics import HEURISTICS, heuristic_dims
    from search.space import build_space

    data = prepare(generate(SyntheticSpec(rows=3000)))
    space = build_space(data.features)
    counts = {f.name: data.counts(f.name) for f in data.features}
    sizes = {rule: space.bytes(space.encode(dims)) for rule, dims in heuristic_dims(data.features, counts).items()}
    budget = sorted(sizes.values())[1]  # the smallest two fit, the others do not
    note = _budget_note(data, space, budget)
    over = [rule for rule, size in sizes.items() if size > budget]
    assert note is not None and note.startswith(f"heuristic baselines over --memory-budget {budget:,} bytes")
    assert len(over) >= 2 and all(f"{HEURISTICS[rule]} ({sizes[rule]:,} bytes)" in note for rule in over)
    assert _budget_note(data, space, max(sizes.values())) is None


def test_a_disk_that_fills_up_during_a_search_ends_it_in_one_line_with_the_resume(tmp_path, monkeypatch, capsys):
    """How the CLI reports a full disk, wherever in the search it is raised (here as Optuna raises it from Tune's
    searcher, inside Tune's own error); `--resume` after it is tests/search/test_faults.py's."""
    import errno

    def full(*args, **kwargs):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise RuntimeError("Tune: the searcher failed") from e

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr("search.runner.run_search", full)
    assert main(["search", "--rows", "500", "--name", "filled", "--output-dir", str(tmp_path / "my runs")]) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err == [f"embsize: error: a disk filled up during search 'filled' (OSError: [Errno 28] No space left on "
                   f"device); free some space, then `embsize search --resume filled --output-dir "
                   f"'{tmp_path / 'my runs'}'` continues it"]

