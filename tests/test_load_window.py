"""The coordinator's load window: epoch-correct slot→expert folding and step-based decay."""

from __future__ import annotations

import numpy as np

from eplb_service.coordinator.load_window import LoadWindow


def test_reports_fold_slots_to_experts_with_their_own_epochs_map():
    window = LoadWindow(num_layers=1, num_logical=3, half_life_steps=1e9)
    old = np.array([[0, 1, 2, 0]])
    new = np.array([[2, 1, 0, 2]])
    counts = np.array([[10, 1, 2, 10]])
    window.add(window.to_logical(counts, old, 3), 0, 10)  # expert 0 in slots 0 and 3 under the old map
    assert np.allclose(window.load, [[20, 1, 2]])
    window.add(window.to_logical(counts, new, 3), 10, 20)  # the same slot counts mean expert 2 under the new map
    assert np.allclose(window.load, [[22, 2, 22]])


def test_window_decays_by_half_life_in_steps_once_per_step_range():
    window = LoadWindow(num_layers=1, num_logical=2, half_life_steps=10)
    phy2log = np.array([[0, 1]])
    window.add(window.to_logical(np.array([[8, 0]]), phy2log, 2), 0, 10)
    window.add(window.to_logical(np.array([[8, 0]]), phy2log, 2), 0, 10)  # a second rank, same range: no extra decay
    assert np.allclose(window.load, [[16, 0]])
    window.add(window.to_logical(np.array([[0, 4]]), phy2log, 2), 10, 20)
    assert np.allclose(window.load, [[8, 4]])
    assert window.steps_covered() == 20 and window.reports == 3


def _report(counts: np.ndarray, epoch: int, begin: int, end: int):
    from eplb_service import protocol

    return protocol.LoadReport(
        rank=0, epoch=epoch, step_begin=begin, step_end=end, slot_load=protocol.NDArray.from_numpy(counts)
    )


def test_the_book_folds_each_report_with_its_epochs_placement_across_commits_and_a_new_deployment():
    """The book reuses each placement's fold index across reports: a commit's new epoch, and a
    new deployment that brings another placement under the same epoch number, fold with theirs."""
    from eplb_service import protocol
    from eplb_service.coordinator.placement_book import LoadRejected, PlacementBook
    from eplb_service.placement import PlacementShape

    model = protocol.ModelShape(num_layers=1, num_logical=3, num_physical=4, num_ranks=2, bytes_per_expert=1)
    shape = PlacementShape(1, 3, 4, 2)
    book = PlacementBook(world_size=2, load_half_life_steps=1e9)
    book.adopt(model, shape, np.array([[0, 1, 2, 0]]), 0)
    book.agree([0, 0])
    counts = np.array([[10, 1, 2, 10]])
    assert book.add_load(_report(counts, 0, 0, 10)).tolist() == [[20, 1, 2]]
    assert book.add_load(_report(counts, 0, 10, 20)).tolist() == [[20, 1, 2]]
    book.commit(0, [0], np.array([[2, 1, 0, 2]]))
    assert book.add_load(_report(counts, 1, 20, 30)).tolist() == [[2, 1, 20]]
    assert book.add_load(_report(counts, 0, 20, 30)).tolist() == [[20, 1, 2]]  # counted before the commit
    book.reset()
    book.adopt(model, shape, np.array([[1, 0, 2, 2]]), 0)
    assert book.add_load(_report(counts, 0, 0, 10)).tolist() == [[1, 10, 12]]
    for bad in (np.array([[1, -1, 0, 0]]), np.array([[1.0, np.nan, 0, 0]]), np.array([[1.0, 0, 0, 2.0**60]])):
        try:
            book.add_load(_report(bad, 0, 10, 20))
        except LoadRejected as exc:
            assert exc.reason == "bad_values" and "slot_load[0, " in str(exc)
        else:
            raise AssertionError(f"accepted {bad}")


def test_the_window_decays_for_every_step_not_once_per_half_life():
    """A report half a half-life after the last weighs the older load by 2**-0.5 already."""
    window = LoadWindow(num_layers=1, num_logical=2, half_life_steps=100)
    window.add(np.array([[8.0, 0.0]]), 0, 100)
    window.add(np.array([[0.0, 4.0]]), 100, 150)
    assert np.allclose(window.load, [[8.0 * 2**-0.5, 4.0]])


def test_complete_segments_feed_the_law_of_surges_once_each_and_never_across_a_gap():
    window = LoadWindow(num_layers=2, num_logical=4, half_life_steps=10)
    calm = np.array([[8.0, 4.0, 2.0, 1.0], [8.0, 4.0, 2.0, 1.0]])
    hot = np.array([[8.0, 4.0, 2.0, 40.0], [8.0, 4.0, 2.0, 1.0]])  # layer 0's coldest expert surges
    window.add(calm, 0, 10)
    window.add(calm, 0, 10)  # a second rank's report of the same segment
    assert window.surge_model() is None
    window.add(hot, 10, 20)  # segment 0 is complete now; segment 1 still fills
    assert window.surges.windows == 1 and window.surge_model() is None
    window.add(calm, 20, 30)
    model = window.surge_model()
    assert model is not None and window.surges.windows == 2
    assert model.rate == 0.5  # one surge in two layers, one pair of segments
    assert np.allclose(model.level[1], model.level[1][0] - np.log([1, 2, 4, 8]))  # 2 x calm
    window.add(calm, 50, 60)  # segments 3 and 4 never came: no surge is read across the gap
    window.add(hot, 60, 70)
    # segments 0, 1, 2 and 5 folded; pairs (0 -> 1) and (1 -> 2), none (2 -> 5)
    assert window.surges.windows == 4 and window.surges.pairs == 2 * 2
