"""Conformance checks and tiny models for plugin authors.

A third-party method or target can be run through the contracts autocomp relies on, on tiny
versions of the zoo's architectures, from the author's own test suite::

    from autocomp.testing import check_method

    def test_my_method_conforms(tmp_path):
        check_method(MyMethod(), {"keep": [0.25, 1.0]}, work_dir=tmp_path)

:func:`check_method`, :func:`check_target` and :func:`check_workload` raise :class:`ConformanceError` (an
``AssertionError``, so pytest shows it as a failed test) listing every broken contract, and
otherwise return a :class:`Report` with what they measured. :func:`tiny_workload` gives a tiny
zoo model with data to try a method on by hand.

This package imports torch; import it in tests, not in a plugin's module.
"""

from autocomp.testing.conformance import (
    DEFAULT_ARCHITECTURES,
    ConformanceError,
    Finding,
    HostTarget,
    Report,
    check_method,
    check_target,
    check_workload,
    narrow_student,
    tiny_workload,
)

__all__ = [
    "DEFAULT_ARCHITECTURES",
    "ConformanceError",
    "Finding",
    "HostTarget",
    "Report",
    "check_method",
    "check_target",
    "check_workload",
    "narrow_student",
    "tiny_workload",
]
