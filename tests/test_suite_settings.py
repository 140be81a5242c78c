"""The suite's own settings: what keeps CI red only for a reason."""

import os

import pytest
from hypothesis import settings


@pytest.mark.skipif(os.environ.get("HYPOTHESIS_PROFILE", "ci") != "ci", reason="another profile asked")
def test_property_tests_draw_the_same_examples_every_run():
    assert settings.default.derandomize
    assert settings.default.database is None  # nothing carried from one run to the next
