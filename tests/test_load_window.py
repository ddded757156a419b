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
