from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.schedulers.async_hyperband import _Bracket as RayBracket

from search.pareto import non_dominated
from search.pareto_asha import MIN_GAIN, ParetoASHA, keeps, outrun
from search.schedulers import SCHEDULERS, decision_epochs, make_scheduler

CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP


def fake_trial(trial_id: str, heuristic: str = "") -> SimpleNamespace:
    """What the schedulers read from a Ray Trial: its id and config (argument-level stand-in)."""
    return SimpleNamespace(trial_id=trial_id, config={"heuristic": heuristic} if heuristic else {})


def result(t: int, auc: float, nbytes: int) -> dict:
    return {"training_iteration": t, "best_val_auc": auc, "model_bytes": nbytes}


def pareto(**kw) -> ParetoASHA:
    return ParetoASHA(**{"max_t": 9, "grace_period": 1, "reduction_factor": 3, **kw})


def report(sched, trial, t, auc, nbytes) -> str:
    return sched.on_trial_result(None, trial, result(t, auc, nbytes))


def added(sched, *ids, heuristic: str = ""):
    trials = [fake_trial(i, heuristic) for i in ids]
    for tr in trials:
        sched.on_trial_add(None, tr)
    return trials


# --- rung decisions ------------------------------------------------------------------------------------------------


def test_pareto_asha_rungs_match_ray_asha():
    for max_t, grace, eta in [(9, 1, 3), (12, 2, 3), (10, 1, 2), (27, 1, 3), (20, 3, 4)]:
        ours = ParetoASHA(max_t=max_t, grace_period=grace, reduction_factor=eta, brackets=2)
        ray = ASHAScheduler(metric="m", mode="max", max_t=max_t, grace_period=grace, reduction_factor=eta, brackets=2)
        for b_ours, b_ray in zip(ours._brackets, ray._brackets):
            assert [m for m, _ in b_ours.rungs] == [m for m, _ in b_ray._rungs]


def test_pareto_asha_first_trial_at_rung_continues_even_if_poor():
    s = pareto()
    (a,) = added(s, "a")
    assert report(s, a, 1, 0.51, 10**6) == CONTINUE


def test_pareto_asha_second_trial_stops_only_if_dominated():
    s = pareto()
    a, b, c = added(s, "a", "b", "c")
    assert report(s, a, 1, 0.70, 1_000) == CONTINUE
    assert report(s, b, 1, 0.65, 100) == CONTINUE  # cheaper, less accurate: not dominated, a tie at the front's end
    s2 = pareto()
    a, b = added(s2, "a", "b")
    report(s2, a, 1, 0.70, 1_000)
    assert report(s2, b, 1, 0.69, 2_000) == STOP  # worse and bigger


def test_pareto_asha_while_n_at_most_eta_only_front_ends_pass():
    s = pareto()
    a, b, c = added(s, "a", "b", "c")
    report(s, a, 1, 0.60, 100)
    report(s, b, 1, 0.70, 10_000)
    assert report(s, c, 1, 0.65, 1_000) == STOP  # on the front, but the crowded middle of three (n=3, keep 1)
    s = pareto()
    a, b, c = added(s, "a", "b", "c")
    report(s, a, 1, 0.60, 100)
    report(s, b, 1, 0.65, 1_000)
    assert report(s, c, 1, 0.70, 10_000) == CONTINUE  # the accurate end of the front


def test_pareto_asha_keeps_top_third_by_rank_then_crowding():
    s = pareto()
    ids = [f"t{i}" for i in range(7)]
    trials = added(s, *ids)
    # A front of four (sizes 10^2..10^5) and two dominated points; the 7th arrives dominated: 2 ahead-of-it > ceil(7/3)
    points = [(0.60, 100), (0.66, 1_000), (0.70, 10_000), (0.72, 100_000), (0.58, 1_000), (0.62, 50_000)]
    for tr, (auc, nb) in zip(trials, points):
        report(s, tr, 1, auc, nb)
    assert report(s, trials[6], 1, 0.64, 2_000) == STOP  # rank 1: the whole front (4) is ahead, keep ceil(7/3)=3


def test_pareto_asha_cheapest_end_survives_where_auc_ranking_stops_it():
    s = pareto()
    trials = added(s, *[f"t{i}" for i in range(6)])
    for tr, auc in zip(trials[:5], [0.70, 0.71, 0.72, 0.73, 0.74]):
        report(s, tr, 1, auc, 100_000)
    assert report(s, trials[5], 1, 0.60, 1_000) == CONTINUE  # the lowest AUC of six, but the cheapest


def test_pareto_asha_stops_at_max_t_and_decides_once_per_rung():
    s = pareto()
    a, b = added(s, "a", "b")
    report(s, a, 1, 0.70, 100)
    assert report(s, b, 1, 0.60, 1_000) == STOP
    assert report(s, b, 2, 0.60, 1_000) == CONTINUE  # no rung at 2: no new decision (Ray applies the STOP)
    assert report(s, a, 2, 0.71, 100) == CONTINUE
    assert report(s, a, 9, 0.72, 100) == STOP  # max_t reached
    assert s.rung_records()[0][1] == {"a": (0.70, pytest.approx(100)), "b": (0.60, pytest.approx(1_000))}


def test_pareto_asha_never_stops_heuristics_but_records_them():
    s = pareto()
    (h,) = added(s, "h", heuristic="sqrt")
    (x,) = added(s, "x")
    assert report(s, h, 1, 0.80, 100) == CONTINUE
    assert report(s, x, 1, 0.70, 1_000) == STOP  # judged against the recorded baseline, which dominates it
    (h2,) = added(s, "h2", heuristic="fastai")
    assert report(s, h2, 1, 0.50, 10**7) == CONTINUE  # dominated, but a baseline
    assert report(s, h2, 9, 0.55, 10**7) == CONTINUE  # not even stopped at max_t: it ends on its own
    assert set(s.rung_records()[0][1]) == {"h", "x", "h2"}


def test_pareto_asha_records_completed_trials_at_their_rung():
    s = pareto()
    a, b = added(s, "a", "b")
    s.on_trial_complete(None, a, result(3, 0.80, 100))  # converged early at epoch 3: recorded at rung 3
    assert set(s.rung_records()[0][3]) == {"a"}
    report(s, b, 1, 0.70, 1_000)
    assert report(s, b, 3, 0.75, 1_000) == STOP


def test_pareto_asha_ignores_results_without_its_attributes():
    s = pareto()
    (a,) = added(s, "a")
    assert s.on_trial_result(None, a, {"training_iteration": 1, "best_val_auc": 0.7}) == CONTINUE
    assert s.on_trial_result(None, a, result(1, math.nan, 100)) == CONTINUE
    assert s.rung_records()[0][1] == {}
    s.on_trial_complete(None, a, None)


@pytest.mark.parametrize(
    "kwargs, word",
    [({"max_t": 0}, "max_t"), ({"grace_period": 10}, "grace_period"), ({"reduction_factor": 1}, "reduction_factor"),
     ({"brackets": 0}, "brackets"), ({"outrun_quantile": 1.5}, "outrun_quantile")],
)
def test_pareto_asha_refuses_bad_settings(kwargs, word):
    with pytest.raises(ValueError, match=word):
        pareto(**kwargs)


def test_pareto_asha_refuses_a_tune_config_metric():
    assert pareto().set_search_properties(None, None)
    assert not pareto().set_search_properties("val_auc", "max")


# --- outrun: stopped when a finished trial dominates even an optimistic end ---------------------------------------


def finish(sched, trial, curve: list[float], nbytes: int) -> None:
    """Report a trial epoch by epoch to its end (trained to the full budget or converged: ``final``)."""
    for t, auc in enumerate(curve, 1):
        r = {**result(t, auc, nbytes), "final": t == len(curve)}
        if t < len(curve):
            assert sched.on_trial_result(None, trial, r) == CONTINUE
    sched.on_trial_complete(None, trial, r)


def test_outrun_projects_by_the_quantile_of_finished_gains():
    # three finished trials gained 0.02, 0.04 and 0.06 after epoch 1; the best ended at 0.76 with 1,000 bytes
    finished = [(0.72, 5_000, [0.70, 0.71, 0.72]), (0.74, 5_000, [0.70, 0.72, 0.74]), (0.76, 1_000, [0.70, 0.73, 0.76])]
    assert outrun(0.70, 2_000, 1, finished, 0.5)  # 0.70 + median 0.04 = 0.74 < 0.76 at fewer bytes
    assert not outrun(0.705, 2_000, 1, finished, 1.0)  # 0.705 + the largest gain 0.06 beats 0.76
    assert outrun(0.705, 2_000, 1, finished, 0.5)
    assert not outrun(0.70, 500, 1, finished, 0.5)  # cheaper than every finished trial: nothing dominates it
    assert not outrun(0.75, 2_000, 1, finished, 0.0)  # 0.75 + 0.02 = 0.77 beats them all
    assert not outrun(0.60, 2_000, 1, finished[:2], 0.5)  # two finished trials are too few to project from
    assert not outrun(0.60, 2_000, 3, finished, 0.5)  # none trained past epoch 3: no gains to read
    unseen = [(a, b, [math.nan, *c[1:]]) for a, b, c in finished]  # epoch 1 not seen (a restored search)
    assert not outrun(0.60, 2_000, 1, unseen, 0.5) and outrun(0.68, 2_000, 2, unseen, 0.5)


def test_outrun_with_a_reference_also_stops_an_end_that_would_add_almost_no_hypervolume():
    # the front of the finished trials is d=(0.76, 1,000 bytes) alone: HV (0.76 - 0.5) * log10(10,000 / 1,000) = 0.26
    finished = [(0.72, 5_000, [0.70, 0.71, 0.72]), (0.74, 5_000, [0.70, 0.72, 0.74]), (0.76, 1_000, [0.70, 0.73, 0.76])]
    ref = (0.5, 10_000)
    # cheaper than every finished trial, so no finished trial dominates its end (0.70 + median 0.04 = 0.74): at 999
    # bytes it would add (0.74 - 0.5) * log10(1,000 / 999) = 0.0001 (0.04% of 0.26), at 900 bytes 0.011 (4.2%)
    assert not outrun(0.70, 999, 1, finished, 0.5)
    assert not outrun(0.70, 999, 1, finished, 0.5, reference=ref, min_gain=0.0)
    assert outrun(0.70, 999, 1, finished, 0.5, reference=ref, min_gain=0.001)
    assert not outrun(0.70, 900, 1, finished, 0.5, reference=ref, min_gain=0.04)
    assert outrun(0.70, 900, 1, finished, 0.5, reference=ref, min_gain=0.05)
    assert not outrun(0.70, 999, 1, finished, 0.5, min_gain=0.05)  # no reference point: dominance only
    assert not outrun(0.70, 999, 1, finished[:2], 0.5, reference=ref, min_gain=0.05)  # too few finished trials
    # a dominated end adds nothing: stopped whatever the threshold
    assert outrun(0.70, 2_000, 1, finished, 0.5, reference=ref, min_gain=0.0)


@pytest.mark.parametrize("min_gain, stops", [(0.001, True), (0.0, False)])
def test_pareto_asha_stops_a_trial_whose_best_end_adds_too_little_hypervolume(min_gain, stops):
    s = with_finished(outrun_quantile=0.5, reference=(0.5, 10_000), min_gain=min_gain)
    (sliver,) = added(s, "sliver")
    # 0.72 at 999 bytes dominates every record at the rung (epoch 1), so the rung rule keeps it; + the median gain
    # 0.04 it ends at 0.76, just cheaper than d0 (0.76 at 1,000 bytes), which it ties rather than falls below: no
    # finished trial dominates that end, and it would add 0.26 * log10(1,000 / 999) = 0.0001 (0.04%) to HV 0.26
    assert report(s, sliver, 1, 0.72, 999) == (STOP if stops else CONTINUE)
    assert f"outrun by a finished trial: {int(stops)}" in s.debug_string()


def test_make_scheduler_hands_pareto_asha_the_searchs_reference_point():
    s = make_scheduler("pareto-asha", max_epochs=12, reference=(0.5, 2e6))
    assert (s._reference, s._min_gain) == ((0.5, 2e6), MIN_GAIN) and 0 < MIN_GAIN < 0.01
    with pytest.raises(ValueError, match="min_gain"):
        pareto(min_gain=1.0)


# finished trials, each on the rung fronts as it goes: the cheapest learns slowest (gains after epoch 1: 0.10, 0.04,
# 0.035; median 0.04) and ends best
FINISHED = {"d0": (1_000, [0.66, 0.70, 0.73, 0.76]), "d1": (2_000, [0.70, 0.72, 0.732, 0.74]),
            "d2": (3_000, [0.71, 0.725, 0.735, 0.745])}


def with_finished(**kw) -> ParetoASHA:
    s = pareto(max_t=9, grace_period=1, reduction_factor=3, **kw)
    for name, (size, curve) in FINISHED.items():
        finish(s, *added(s, name), curve, size)
    return s


@pytest.mark.parametrize("quantile, stops", [(0.5, True), (1.0, False), (None, False)])
def test_pareto_asha_stops_a_trial_a_finished_one_outruns_where_the_rung_rule_keeps_it(quantile, stops):
    s = with_finished(outrun_quantile=quantile)
    late, top = added(s, "late", "top")
    # 0.715 at 5,000 bytes has the rung's best AUC at epoch 1, so the rung rule keeps it (quantile None); with the
    # median gain it ends at 0.755, below d0's 0.76 at 1,000 bytes: outrun. With the largest gain (0.10) it would not be.
    assert report(s, late, 1, 0.715, 5_000) == (STOP if stops else CONTINUE)
    assert report(s, top, 1, 0.73, 5_000) == CONTINUE  # 0.73 + 0.04 = 0.77 would beat every finished trial
    assert f"outrun by a finished trial: {int(stops)}" in s.debug_string()


@pytest.mark.parametrize("quantile, stops", [(0.5, True), (None, False)])
def test_pareto_asha_tests_outrun_between_rungs(quantile, stops):
    s = with_finished(outrun_quantile=quantile)  # rungs at epochs 1 and 3
    (mid,) = added(s, "mid")
    assert report(s, mid, 1, 0.73, 5_000) == CONTINUE  # 0.73 + median gain 0.04 after epoch 1 would beat 0.76
    # epoch 2 is no rung; the finished trials gained 0.06, 0.02, 0.02 after it, so 0.731 + 0.02 ends below d0
    assert report(s, mid, 2, 0.731, 5_000) == (STOP if stops else CONTINUE)


def test_pareto_asha_tests_outrun_only_from_the_grace_period():
    s = pareto(max_t=9, grace_period=2, reduction_factor=3, outrun_quantile=0.5)
    for name, (size, curve) in FINISHED.items():
        finish(s, *added(s, name), curve, size)
    (slow,) = added(s, "slow")
    assert report(s, slow, 1, 0.60, 5_000) == CONTINUE  # 0.60 + 0.04 ends below d0, but epoch 1 is not judged
    # the rung at epoch 2: the best AUC recorded there keeps it on rank; + median gain 0.02 it ends below d0: outrun
    assert report(s, slow, 2, 0.735, 5_000) == STOP
    assert "outrun by a finished trial: 1" in s.debug_string()


def test_pareto_asha_save_restore_keeps_finished_trials(tmp_path):
    s = with_finished(outrun_quantile=0.5)
    s.save(str(tmp_path / "sched.pkl"))
    t = pareto(max_t=9, grace_period=1, reduction_factor=3)
    t.restore(str(tmp_path / "sched.pkl"))
    (late,) = added(t, "late")
    assert report(t, late, 1, 0.715, 5_000) == STOP  # outrun by d0, as before the save


def test_pareto_asha_outrun_spares_heuristics_and_ignores_stopped_trials():
    s = with_finished()
    (base,) = added(s, "base", heuristic="sqrt")
    assert report(s, base, 1, 0.60, 50_000) == CONTINUE  # a baseline always trains to the end
    assert len(s._finished) == 3
    t = pareto(max_t=9, grace_period=1, reduction_factor=3)
    stopped = added(t, "s0", "s1", "s2")
    for tr in stopped:  # ended without "final": stopped early, so no gains are read from them
        t.on_trial_result(None, tr, result(1, 0.80, 100))
        t.on_trial_complete(None, tr, {**result(1, 0.80, 100), "final": False})
    assert t._finished == []


def test_pareto_asha_reads_gains_from_sampled_trials_not_from_the_baselines():
    """The baselines finish first and, being fixed configs, may gain nothing after the grace period while the sampled
    trials still learn: their ends can outrun a trial, their curves set no projection (every sampled trial was once
    stopped at the grace period on a MovieLens CSV)."""
    s = pareto(max_t=9, grace_period=1, reduction_factor=3, outrun_quantile=0.5)  # rungs at epochs 1, 3
    for i, (auc, size) in enumerate([(0.74, 1_000), (0.75, 3_000), (0.76, 9_000)]):
        finish(s, *added(s, f"b{i}", heuristic="sqrt"), [0.60, auc, auc, auc], size)  # no gain after epoch 2
    (x,) = added(s, "x")
    assert report(s, x, 1, 0.65, 2_000) == CONTINUE  # the best AUC at the rung
    # epoch 2 (no rung): 0.72 at 2,000 bytes ends below b0 (0.74 at 1,000 bytes) if it gains no more, as the
    # baselines did; but no sampled trial has finished, so nothing projects its end
    assert report(s, x, 2, 0.72, 2_000) == CONTINUE
    assert "outrun by a finished trial: 0" in s.debug_string()
    for name, (size, curve) in FINISHED.items():  # sampled trials converge, gaining 0.06, 0.02, 0.02 after epoch 2
        (d,) = added(s, name)
        for t, auc in enumerate(curve, 1):  # their decisions do not matter here, only that they end ``final``
            s.on_trial_result(None, d, result(t, auc, size * 10))
        s.on_trial_complete(None, d, {**result(len(curve), curve[-1], size * 10), "final": True})
    y, z = added(s, "y", "z")
    assert report(s, y, 1, 0.705, 2_000) == CONTINUE and report(s, z, 1, 0.71, 2_000) == CONTINUE
    assert report(s, y, 2, 0.71, 2_000) == STOP  # 0.71 + the median 0.02 ends below b0: outrun
    assert report(s, z, 2, 0.73, 2_000) == CONTINUE  # 0.75 at 2,000 bytes: no finished trial dominates it


def test_pareto_asha_save_restore_keeps_rungs(tmp_path):
    s = pareto()
    a, b = added(s, "a", "b")
    report(s, a, 1, 0.70, 100)
    s.save(str(tmp_path / "sched.pkl"))
    t = pareto()
    t.restore(str(tmp_path / "sched.pkl"))
    assert t.rung_records() == s.rung_records()
    assert report(t, b, 1, 0.60, 1_000) == STOP


def test_pareto_asha_retried_trial_keeps_bracket_and_rung_decisions():
    s = pareto(brackets=3, max_t=27)
    trials = added(s, *[str(i) for i in range(20)])
    before = [s._trial_info[t.trial_id] for t in trials]
    for t in trials:
        s.on_trial_error(None, t)
        s.on_trial_add(None, t)  # Ray's requeue after a lost worker
    assert [s._trial_info[t.trial_id] for t in trials] == before


def test_pareto_asha_brackets_are_seeded():
    def assignment(seed):
        s = pareto(brackets=3, seed=seed, max_t=27)
        added(s, *[str(i) for i in range(30)])
        return [s._brackets.index(s._trial_info[str(i)]) for i in range(30)]

    assert assignment(1) == assignment(1)
    assert len(set(assignment(1))) > 1


def test_make_scheduler_pareto_asha_is_the_default():
    assert SCHEDULERS[0] == "pareto-asha"
    s = make_scheduler("pareto-asha", max_epochs=12, grace_period=2, reduction_factor=3)
    assert isinstance(s, ParetoASHA)
    assert [m for m, _ in s._brackets[0].rungs] == [6, 2]
    with pytest.raises(ValueError, match="pareto-asha"):
        make_scheduler("hyperband", max_epochs=12)


@pytest.mark.parametrize("kind", ["asha", "pareto-asha"])
@pytest.mark.parametrize("max_epochs,grace,eta", [(12, 2, 3), (20, 1, 3), (10, 1, 2), (9, 3, 4)])
def test_decision_epochs_are_every_epoch_where_the_scheduler_stops_a_trial(kind, max_epochs, grace, eta):
    """Trials wait for Tune's answer only at these epochs (search.trial._Reporter): a STOP anywhere else would come an
    epoch late. Drive the real scheduler with many trials of random AUC and size: all its STOPs fall on them."""
    import numpy as np

    sched = make_scheduler(kind, max_epochs, grace, eta)
    epochs = decision_epochs(sched, max_epochs)
    rng = np.random.default_rng(0)
    stops = set()
    for i in range(60):
        (tr,) = added(sched, f"t{i}")
        size = int(rng.integers(10**3, 10**6))
        for t in range(1, max_epochs + 1):
            if sched.on_trial_result(None, tr, result(t, float(rng.uniform(0.5, 0.8)), size)) == STOP:
                stops.add(t)
                break
    assert stops and stops <= epochs, (sorted(stops), sorted(epochs))
    assert max_epochs in epochs and grace in epochs


def test_decision_epochs_fifo_none_and_unknown_every_epoch():
    from ray.tune.schedulers import MedianStoppingRule

    assert decision_epochs(make_scheduler("fifo", 10), 10) == frozenset()
    assert decision_epochs(MedianStoppingRule(metric="m", mode="max"), 10) is None


# --- keeps() against Ray's ASHA on one objective -------------------------------------------------------------------


@given(st.lists(st.integers(0, 6), min_size=0, max_size=20), st.integers(0, 6), st.sampled_from([2, 3, 4]))
def test_keeps_on_auc_alone_agrees_with_ray_asha_outside_its_interpolation(previous, new, eta):
    """With all sizes equal, only a reward in [lo, hi) of ASHA's two interpolated neighbours may be decided differently."""
    points = [(-v, 3.0) for v in previous] + [(-new, 3.0)]
    ours = keeps(points, len(points) - 1, eta)
    cutoff = RayBracket(1, 9, eta, 0).cutoff({str(i): v for i, v in enumerate(previous)})
    ray_continues = cutoff is None or new >= cutoff
    if previous:
        d = (len(previous) - 1) / eta  # ASHA's cutoff, counted from the best recorded reward
        desc = sorted(previous, reverse=True)
        # At a whole d Ray's percentile may still interpolate a float's width toward a neighbour: for previous=[0] * 7
        # + [1] * 3 and eta=3 (found by hypothesis) its cutoff is np.percentile(previous, 66.66666666666667) = 8.9e-16,
        # so it stops new=0, which ties the 4th best and which we keep. [lo, hi) spans both neighbours of a whole d.
        lo = desc[min(len(desc) - 1, math.ceil(d + 1e-9))]
        hi = desc[max(0, math.floor(d - 1e-9))]
        if lo <= new < hi:  # empty when ASHA's quantile falls on a recorded value
            return
    assert ours == ray_continues


# --- scenario: ASHA stops a trial of the true final front, Pareto-ASHA keeps it ----------------------------------

# Learning curves of best val AUC over 9 epochs. "cheap" (1 KB) learns slowly: its AUC is the lowest at epochs 1
# and 3, yet at epoch 9 it is the only small model within reach of the big ones, so it lies on the final front.
CURVES = {
    "big-a": (100_000, [0.700, 0.720, 0.740, 0.750, 0.755, 0.760, 0.762, 0.764, 0.765]),
    "big-b": (80_000, [0.705, 0.722, 0.738, 0.745, 0.750, 0.752, 0.754, 0.755, 0.756]),
    "big-c": (120_000, [0.702, 0.718, 0.735, 0.744, 0.748, 0.750, 0.751, 0.752, 0.753]),
    "mid-a": (20_000, [0.690, 0.705, 0.720, 0.728, 0.732, 0.735, 0.737, 0.738, 0.739]),
    "mid-b": (30_000, [0.692, 0.700, 0.712, 0.720, 0.724, 0.726, 0.728, 0.729, 0.730]),
    "cheap": (1_000, [0.620, 0.660, 0.690, 0.710, 0.725, 0.735, 0.742, 0.746, 0.748]),
    "wide-bad": (150_000, [0.680, 0.690, 0.700, 0.705, 0.708, 0.710, 0.711, 0.712, 0.713]),
}


def drive(sched) -> dict[str, int]:
    """Feed every live trial's epoch-t result, epoch by epoch in a fixed order; return the epochs each trial ran."""
    trials = {name: fake_trial(name) for name in CURVES}
    for tr in trials.values():
        sched.on_trial_add(None, tr)
    ran = {}
    live = list(CURVES)
    for t in range(1, 10):
        for name in list(live):
            nbytes, curve = CURVES[name]
            r = result(t, curve[t - 1], nbytes)
            ran[name] = t
            if sched.on_trial_result(None, trials[name], r) == STOP:
                live.remove(name)
                sched.on_trial_complete(None, trials[name], r)
    return ran


def test_scenario_asha_stops_a_final_front_trial_that_pareto_asha_keeps():
    names = list(CURVES)
    auc = [CURVES[n][1][-1] for n in names]
    size = [CURVES[n][0] for n in names]
    true_front = {n for n, m in zip(names, non_dominated(auc, size)) if m}
    assert "cheap" in true_front

    asha = ASHAScheduler(metric="best_val_auc", mode="max", max_t=9, grace_period=1, reduction_factor=3)
    ours = ParetoASHA(max_t=9, grace_period=1, reduction_factor=3)
    asha_ran, ours_ran = drive(asha), drive(ours)

    assert asha_ran["cheap"] < 9  # ASHA stopped it on AUC alone
    assert ours_ran["cheap"] == 9  # Pareto-ASHA trained it to the end
    assert ours_ran["wide-bad"] < 9  # and still stops dominated trials
    survivors = {n for n, t in ours_ran.items() if t == 9}
    assert true_front <= survivors
    assert sum(ours_ran.values()) < 9 * len(CURVES)  # it saved epochs


# --- a real search: stopped trials reach Optuna as PRUNED and stay off the front ----------------------------------


@pytest.mark.slow
def test_run_search_pareto_asha_prunes_in_optuna_and_front(ray_session, tracking_uri, tmp_path):
    import optuna

    from pipelines import prepare
    from pipelines.synthetic import SyntheticSpec, generate
    from search.runner import SearchSettings, run_search
    from search.space import SearchSpec, build_space

    data = prepare(generate(SyntheticSpec(rows=4_000, seed=1)), seed=1)
    space = build_space(data.features, SearchSpec(max_dim=16, lr=0.01))
    settings = SearchSettings(
        name="pasha", trials=10, max_epochs=4, patience=0, scheduler="pareto-asha", grace_period=1,
        reduction_factor=3, heuristics=False, seed=0, tracking_uri=tracking_uri, output_dir=str(tmp_path / "out"),
    )
    res = run_search(data, space, settings)

    stopped = {r["trial_id"] for r in res.trials if r["outcome"] == "stopped_early"}
    completed = {r["trial_id"] for r in res.trials if r["outcome"] == "completed"}
    assert stopped and completed
    assert all(r["epochs"] < 4 for r in res.trials if r["trial_id"] in stopped)
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(res.out / "optuna.journal"))
    )
    study = optuna.load_study(study_name=res.study_name, storage=storage)
    state = {t.user_attrs["ray_trial_id"]: t.state for t in study.trials if "ray_trial_id" in t.user_attrs}
    assert {state[i] for i in stopped} == {optuna.trial.TrialState.PRUNED}
    assert {state[i] for i in completed} == {optuna.trial.TrialState.COMPLETE}
    assert {r["trial_id"] for r in res.front} <= completed
    assert not {t.user_attrs["ray_trial_id"] for t in study.best_trials} & stopped
