"""The shape every refused command line must have: exit 2, one `evalsuite: error:` message on stderr, no
traceback (tests that drive `evalsuite.cli.main` share it)."""

from __future__ import annotations

import pytest


def expect_error(capsys: pytest.CaptureFixture[str], code: int, *needles: str) -> str:
    """Assert `code` is 2 and stderr is one error message holding every needle; return stderr."""
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("evalsuite: error:") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err
