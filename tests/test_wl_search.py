"""Seed 002's greedy word-length search on synthetic oracles."""

from __future__ import annotations

import pytest


from qcompiler.fl_search import compression_rate
from qcompiler.wl_search import greedy_wl_search

ELEMENTS = {"conv1": 500, "conv2": 5000, "fc": 20000, "fc_out": 300}
WEIGHT = {"conv1": 3.0, "conv2": 0.5, "fc": 0.05, "fc_out": 2.0}  # sensitivity per tensor


def oracle(calls):
    def accuracy(wl):
        calls.append(dict(wl))
        return 1.0 - sum(WEIGHT[n] * 4.0 ** (-wl[n]) for n in wl)
    return accuracy


def test_search_respects_max_loss_and_compresses():
    calls = []
    result = greedy_wl_search(ELEMENTS, {n: 8 for n in ELEMENTS}, oracle(calls), max_loss=0.02, target_compression=0.0)
    assert result.loss <= 0.02 + 1e-12
    assert result.compression < compression_rate([8] * 4, list(ELEMENTS.values()))
    assert result.evaluations == len(calls)
    # the insensitive, large FC layer gives up the most bits; the sensitive first conv the fewest
    assert result.word_lengths["fc"] < result.word_lengths["conv1"]
    compressions = [c for *_, c in result.log]
    assert compressions == sorted(compressions, reverse=True)


def test_phase_a_takes_the_largest_cheap_tensor_and_stops_at_target():
    calls = []
    result = greedy_wl_search(ELEMENTS, {n: 8 for n in ELEMENTS}, oracle(calls), max_loss=0.3,
                              phases=("compress_first",), target_compression=0.2)
    assert result.log[0][1] == "fc"
    assert result.compression <= 0.2 or result.loss >= 0.1


def test_overshoot_is_undone_unless_tune_recovers():
    greedy = greedy_wl_search({"a": 100}, {"a": 2}, lambda wl: 1.0 - (0.0 if wl["a"] >= 2 else 0.5),
                              max_loss=0.1, phases=("loss_first",), target_compression=0.0)
    assert greedy.word_lengths == {"a": 2} and greedy.loss == 0.0
    # a tune that retrains: afterwards 1 bit costs only 0.05, then the final tune (loss above
    # max_loss/10) brings it to 0.005
    state = {"penalty": 0.5}
    calls = []

    def tune(wl, min_accuracy):
        calls.append((dict(wl), min_accuracy))
        state["penalty"] = 0.05 if len(calls) == 1 else 0.005
        return True

    tuned = greedy_wl_search({"a": 100}, {"a": 2}, lambda wl: 1.0 - (0.0 if wl["a"] >= 2 else state["penalty"]),
                             max_loss=0.1, phases=("loss_first",), target_compression=0.0, tune=tune, min_wl=1)
    assert tuned.word_lengths == {"a": 1}
    assert calls == [({"a": 1}, 0.9), ({"a": 1}, 0.99)]
    assert tuned.loss == pytest.approx(0.005)
    assert [row[0] for row in tuned.log] == ["tune", "loss_first", "tune"]


def test_min_wl_sentinel():
    result = greedy_wl_search({"a": 10}, {"a": 1}, lambda wl: 1.0, max_loss=0.1, target_compression=0.0)
    assert result.word_lengths == {"a": 1} and result.log == ()
