"""pali_jax.model_dir: converted directories, their manifest and `pali-jax verify`."""

from __future__ import annotations

import pytest
from hostile import (
    VERIFY_BAD,
    _chunk,
    _swap,
    assert_one_line_error,
    call,
    converted,  # noqa: F401  (fixtures)
    verify_main,
)

from pali_jax.pretrained import PaliGemma


@pytest.mark.parametrize("case", sorted(VERIFY_BAD))
def test_verify_finds(converted, capsys, case):
    damage, message = VERIFY_BAD[case]
    damage(converted)
    code, out, err = call(verify_main, [converted], capsys)
    assert_one_line_error(code, err, message)


def test_verify_accepts_a_fresh_conversion_and_a_swapped_chunk_still_loads_sizes(converted, capsys):
    code, out, err = call(verify_main, [converted], capsys)
    assert code == 0 and err == "" and out.startswith(f"ok: {converted} (")
    _swap(_chunk(converted))  # same size: loading's stat check passes, only verify's hash sees it
    PaliGemma.from_pretrained(converted)
