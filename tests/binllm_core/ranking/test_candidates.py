"""The union of time-aware popular items into the lists the LLM re-ranks: which places they
take, what they never bring, and the number of places chosen on valid Recall@N."""

from __future__ import annotations

import numpy as np
import pytest

from binllm_core.ranking.candidates import choose_places, union_popular


def test_popular_items_take_the_last_places_but_never_an_excluded_or_listed_item() -> None:
    ranked = np.array([10, 11, 12, 13, 14, 15])
    popular = np.array([11, 99, 98, 97, 96])
    got = union_popular(ranked, popular, np.array([99]), n=5, places=2)
    # The codes' first 3, then the popular items that are neither listed (11) nor excluded (99).
    np.testing.assert_array_equal(got, [10, 11, 12, 98, 97])
    np.testing.assert_array_equal(union_popular(ranked, popular, [], 5, 0), ranked[:5])


def test_the_codes_fill_the_places_too_few_popular_items_can_take() -> None:
    got = union_popular(np.array([1, 2, 3, 4, 5]), np.array([2, 7]), np.array([]), n=4, places=3)
    # Only two popular items (2, also the codes' second, and 7): the codes' next fills the list.
    np.testing.assert_array_equal(got, [1, 2, 7, 3])
    assert len(set(got)) == 4


def test_places_are_chosen_by_valid_recall_and_zero_wins_a_tie() -> None:
    lists = {1: np.array([1, 2, 3, 4]), 2: np.array([5, 6, 7, 8]), 3: np.array([1, 2, 3, 4])}
    popular = np.array([50, 51, 52])
    # Users 1 and 2 liked popular items the codes missed; user 3 liked the codes' 4th.
    positives = {1: np.array([50]), 2: np.array([51]), 3: np.array([4]), 4: np.array([9])}
    choice = choose_places(lists, positives, {}, popular, n=4, grid=[0, 1, 2, 3], window_days=30)
    assert choice.valid_users == 3  # user 4 has no list
    assert choice.valid_recall[0] == pytest.approx(1 / 3)
    assert choice.valid_recall[1] == pytest.approx(1 / 3)  # 50 in, the 4th items out
    assert choice.valid_recall[2] == pytest.approx(2 / 3)
    assert choice.valid_recall[3] == pytest.approx(2 / 3)
    assert choice.places == 2  # the smaller of the best
    summary = choice.summary()
    assert summary["valid_lift"] == pytest.approx(1 / 3)
    assert summary["chosen_by"] == "valid Recall@4" and summary["window_days"] == 30
    # Popular items that help no one: the codes' own lists stay.
    useless = choose_places(lists, positives, {}, np.array([70, 71]), 4, [0, 1, 2])
    assert useless.places == 0 and useless.summary()["valid_lift"] == 0


def test_an_excluded_popular_item_is_never_given_and_no_valid_user_keeps_the_codes() -> None:
    lists = {1: np.array([1, 2, 3])}
    positives = {1: np.array([50])}
    excluded = {1: np.array([50])}  # the user already has it: it can never count as found
    choice = choose_places(lists, positives, excluded, np.array([50, 51]), 3, [0, 1])
    assert choice.places == 0
    nobody = choose_places({}, positives, {}, np.array([50]), 3, [0, 1])
    assert nobody.places == 0 and nobody.summary()["chosen_by"] == "no valid users"
