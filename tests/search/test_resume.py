"""What identifies a search, and the refusals of a resume that would change it (search/resume.py)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipelines import SyntheticSpec, generate, prepare
from search.resume import check_name, check_same, identity, load, save, stored_command
from search.runner import SearchSettings
from search.space import SearchSpec, build_space


@pytest.fixture(scope="module")
def data():
    return prepare(generate(SyntheticSpec(rows=2000, seed=4)))


@pytest.fixture(scope="module")
def space(data):
    return build_space(data.features, SearchSpec(max_dim=16))


SETTINGS = SearchSettings(name="s", trials=4, max_epochs=3, output_dir="out")
URI = "sqlite:////tmp/x/mlflow.db"


@given(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,40}", fullmatch=True))
def test_check_name_accepts_plain_names(name):
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "-flag", "a b", "x" * 101, "é"])
def test_check_name_refuses_paths_and_odd_names(name):
    with pytest.raises(ValueError, match="is not a plain name"):
        check_name(name)


def test_identity_ignores_where_and_how_the_search_runs(data, space):
    base = identity(SETTINGS, data, space, URI)
    moved = replace(SETTINGS, address="10.0.0.1:6379", num_cpus=2, max_failures=5, rule="knee", epsilon=0.01,
                    output_dir="elsewhere")
    check_same({"identity": base}, identity(moved, data, space, URI), "s")  # no error


@pytest.mark.parametrize(
    "change, message",
    [
        ({"trials": 8}, "started with trials=4, but this run has 8"),
        ({"max_epochs": 5}, "max_epochs=3, but this run has 5"),
        ({"memory_budget": 1000}, "memory_budget=(none), but this run has 1000"),
        ({"seed": 1}, "seed=0, but this run has 1"),
        ({"scheduler": "fifo"}, "scheduler=pareto-asha, but this run has fifo"),
    ],
)
def test_check_same_names_the_changed_setting(change, message, data, space):
    before = {"identity": identity(SETTINGS, data, space, URI)}
    with pytest.raises(ValueError) as e:
        check_same(before, identity(replace(SETTINGS, **change), data, space, URI), "s")
    assert message in str(e.value) and "--resume s" in str(e.value) and "--name" in str(e.value)


def test_check_same_refuses_other_data_space_or_store(data, space):
    before = {"identity": identity(SETTINGS, data, space, URI)}
    other = prepare(generate(SyntheticSpec(rows=2000, seed=5)))
    with pytest.raises(ValueError, match="dataset fingerprint="):
        check_same(before, identity(SETTINGS, other, space, URI), "s")
    with pytest.raises(ValueError, match="space ranges="):
        check_same(before, identity(SETTINGS, data, build_space(data.features, SearchSpec(max_dim=8)), URI), "s")
    with pytest.raises(ValueError, match="is tracked in 'sqlite:////tmp/x/mlflow.db', but this run uses"):
        check_same(before, identity(SETTINGS, data, space, "sqlite:////tmp/y/mlflow.db"), "s")


def test_identity_keeps_no_credentials(data, space):
    ident = identity(SETTINGS, data, space, "https://alice:s3cret@mlflow.example.com")
    assert ident["tracking_uri"] == "https://mlflow.example.com"
    assert "s3cret" not in repr(ident)


def test_save_load_and_stored_command(tmp_path, data, space):
    out = tmp_path / "s"
    assert load(out) is None
    with pytest.raises(ValueError, match="no search named 's' in"):
        stored_command(out, "s")
    save(out, identity(SETTINGS, data, space, URI), {"trials": 4, "rows": 2000})
    assert stored_command(out, "s") == {"trials": 4, "rows": 2000}
    assert load(out)["identity"]["dataset"]["fingerprint"] == data.fingerprint
    (out / "search.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot be read"):
        load(out)


def _hold(out: str, ready) -> None:
    import time

    from search.resume import claimed

    with claimed(Path(out), "held"):
        ready.set()
        time.sleep(120)  # until killed


def test_a_search_claimed_by_another_process_is_refused_until_that_process_ends(tmp_path):
    import multiprocessing as mp

    from search.resume import SearchRunning, check_not_running, claimed

    out = tmp_path / "s"
    out.mkdir()
    check_not_running(out, "s")  # no lock file yet: nobody runs it
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(out), ready))
    holder.start()
    assert ready.wait(timeout=60)
    with pytest.raises(SearchRunning, match=r"search 's' is running in another process now .*another --name"):
        check_not_running(out, "s")
    with pytest.raises(SearchRunning):
        with claimed(out, "s"):
            pytest.fail("claimed a search another process holds")
    holder.kill()  # killed, not ended: the OS frees its lock all the same
    holder.join(timeout=30)
    check_not_running(out, "s")
    with claimed(out, "s"):
        with pytest.raises(SearchRunning):  # held by this process: a second claim here is refused as well
            with claimed(out, "s"):
                pass


def test_fresh_search_refuses_a_taken_name_before_starting_anything(tmp_path, data, space):
    import ray

    from search.resume import NameTaken
    from search.runner import run_search

    settings = replace(SETTINGS, output_dir=str(tmp_path / "out"), tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    settings.out.mkdir(parents=True)
    save(settings.out, identity(settings, data, space, settings.tracking_uri), None)  # a search of that name
    before = (settings.out / "search.json").read_text()
    ray_before = ray.is_initialized()
    with pytest.raises(NameTaken, match="search name 's' is taken in"):
        run_search(data, space, settings, fresh=True)
    assert ray.is_initialized() == ray_before  # no local Ray started for it
    assert (settings.out / "search.json").read_text() == before and not (tmp_path / "m.db").exists()


def test_fresh_name_skips_names_in_use(tmp_path):
    from search.cli import _fresh_name

    assert _fresh_name(tmp_path, "synthetic-20261202-101010") == "synthetic-20261202-101010"
    (tmp_path / "synthetic-20261202-101010").mkdir()
    (tmp_path / "synthetic-20261202-101010-2").mkdir()
    assert _fresh_name(tmp_path, "synthetic-20261202-101010") == "synthetic-20261202-101010-3"


def test_repair_drops_journal_records_cut_short_and_keeps_optunas_study_readable(tmp_path):
    """A full disk cut a journal record short; the next append was glued to it, and Optuna then refused the journal.
    The repair keeps every whole record (the glued one's too) and the study loads with all its trials."""
    import optuna

    from search.resume import repair

    path = tmp_path / "optuna.journal"

    def storage():
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="s", storage=storage())
    for x in (1.0, 2.0):
        study.enqueue_trial({"x": x})
        study.optimize(lambda t: t.suggest_float("x", 0, 3), n_trials=1)
    whole = path.read_bytes()
    lines = whole.split(b"\n")[:-1]
    cut = lines[-1][: len(lines[-1]) // 2]  # the last record cut short by the full disk ...
    path.write_bytes(b"\n".join(lines[:-1]) + b"\n" + cut)
    assert repair(tmp_path, tmp_path / "no-ray") == [f"the Optuna journal {path}: 1 record(s) cut short dropped"]
    assert path.read_bytes() == b"\n".join(lines[:-1]) + b"\n"
    # ... and, cut before the records after it, glued to the next one: Optuna refuses a bad line before the last
    cut = lines[-2][: len(lines[-2]) // 2]
    path.write_bytes(b"\n".join(lines[:-2]) + b"\n" + cut + lines[-2] + b"\n" + lines[-1] + b"\n")
    with pytest.raises(ValueError):
        optuna.load_study(study_name="s", storage=storage())
    assert repair(tmp_path, tmp_path / "no-ray") == [f"the Optuna journal {path}: 1 record(s) cut short dropped"]
    assert path.read_bytes() == whole
    assert [t.params["x"] for t in optuna.load_study(study_name="s", storage=storage()).trials] == [1.0, 2.0]
    assert repair(tmp_path, tmp_path / "no-ray") == []  # a whole journal is left as it is


def test_repair_moves_a_ray_snapshot_that_does_not_load_aside(tmp_path):
    import json
    import pickle

    from search.resume import repair

    for stamp, ok in (("2026-12-01_10-00-00", True), ("2026-12-02_10-00-00", True), ("2026-12-03_10-00-00", False)):
        state = json.dumps({"trials": [1, 2, 3]}).encode()
        (tmp_path / f"experiment_state-{stamp}.json").write_bytes(state if ok else state[:7])
        (tmp_path / f"searcher-state-{stamp}.pkl").write_bytes(pickle.dumps({"n": 3}))
    assert repair(tmp_path / "none", tmp_path) == [
        f"Ray Tune's state of 2026-12-03_10-00-00 in {tmp_path} does not load: moved aside"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "corrupt-experiment_state-2026-12-03_10-00-00.json", "corrupt-searcher-state-2026-12-03_10-00-00.pkl",
        "experiment_state-2026-12-01_10-00-00.json", "experiment_state-2026-12-02_10-00-00.json",
        "searcher-state-2026-12-01_10-00-00.pkl", "searcher-state-2026-12-02_10-00-00.pkl"]
    (tmp_path / "searcher-state-2026-12-02_10-00-00.pkl").write_bytes(pickle.dumps({"n": 3})[:-3])  # a pickle cut
    assert repair(tmp_path / "none", tmp_path) == [
        f"Ray Tune's state of 2026-12-02_10-00-00 in {tmp_path} does not load: moved aside"]
    assert (tmp_path / "experiment_state-2026-12-01_10-00-00.json").exists()


def test_the_resume_command_printed_for_a_folder_with_spaces_can_be_pasted(tmp_path):
    import shlex

    from search.runner import SearchInterrupted

    out = tmp_path / "my runs ü"
    message = str(SearchInterrupted.of(replace(SETTINGS, output_dir=str(out))))
    command = message.split("`")[1]
    assert shlex.split(command) == ["embsize", "search", "--resume", "s", "--output-dir", str(out)]
