"""Byte counts in log lines: the unit follows the size, so a small plan is not '0.0 MiB'."""

import pytest

from eplb_service.units import human_bytes


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (23 * 1024 + 512, "23.5 KiB"),
        (3 * 2**20 // 2, "1.5 MiB"),
        (2**30 - 1, "1024.0 MiB"),  # rounds for display, never picks a unit below 1
        (2**31, "2.00 GiB"),
        (5 * 2**40, "5.00 TiB"),
        (3 * 2**50, "3072.00 TiB"),
    ],
)
def test_unit_follows_size(n, text):
    assert human_bytes(n) == text


def test_negative_count_is_refused_with_the_value():
    with pytest.raises(ValueError, match="-5"):
        human_bytes(-5)
