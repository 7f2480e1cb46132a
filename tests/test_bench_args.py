"""The benchmark scripts' shared arguments (bench/load.py): what a user
types on the command line is what runs."""
import sys

import pytest

from tests.kit import ROOT

sys.path.insert(0, str(ROOT / 'bench'))
import load  # noqa: E402


@pytest.mark.parametrize('argv, repeats, duration', [
    ([], 5, 5.0),
    (['--quick'], 3, 3.0),
    # Explicit values win over --quick, even when they equal the defaults.
    (['--quick', '--repeats', '5'], 5, 3.0),
    (['--duration', '5', '--quick'], 3, 5.0),
    (['--repeats', '7', '--duration', '1.5'], 7, 1.5)])
def test_quick_shortens_only_what_was_not_given(argv, repeats, duration):
    args = load.ab_args(load.ab_parser('bench', 'x'), argv)
    assert (args.repeats, args.duration) == (repeats, duration)
