import pytest

from planner.units import format_size, parse_size


@pytest.mark.parametrize("text,expected", [
    ("8GB", 8 * 10**9), ("8GiB", 8 * 2**30), ("7.5 GB", 7_500_000_000), ("512MiB", 512 * 2**20),
    ("512mib", 512 * 2**20), ("1TB", 10**12), ("100", 100), ("100B", 100), (4096, 4096), ("1.5KiB", 1536),
])
def test_accepted_forms(text, expected):
    assert parse_size(text) == expected


def test_gb_is_decimal_and_gib_binary():
    assert parse_size("8GB") == 8_000_000_000
    assert parse_size("8GiB") == 8_589_934_592
    assert parse_size("8GiB") - parse_size("8GB") == 589_934_592


@pytest.mark.parametrize("bad", ["8XB", "GB", "", "-1GB", "8 G B", "eight GB", -5, 3.5, None, True, "1e9"])
def test_rejected_forms_name_the_input(bad):
    with pytest.raises(ValueError) as info:
        parse_size(bad)
    assert repr(bad) in str(info.value) and "8GiB" in str(info.value)


def test_format_size():
    assert format_size(2**30) == "1.00 GiB"
    assert format_size(3 * 2**20) == "3.0 MiB"
