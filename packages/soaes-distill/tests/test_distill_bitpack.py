"""Bit-packing of token ids round-trips at every width and uses exactly ceil(log2 V) bits."""

import numpy as np
import pytest

from soaes_core.errors import InvalidArgumentError
from soaes_distill.bitpack import bits_for_vocab, pack_ids, unpack_ids


@pytest.mark.parametrize("bits", [1, 5, 8, 15, 16, 17, 18, 32])
def test_round_trip(bits: int) -> None:
    rng = np.random.default_rng(bits)
    ids = rng.integers(0, 2 ** bits, size=1001, dtype=np.int64)
    data = pack_ids(ids, bits)
    assert len(data) == -(-1001 * bits // 8)
    np.testing.assert_array_equal(unpack_ids(data, bits, 1001), ids)


def test_bits_for_vocab() -> None:
    assert bits_for_vocab(49152) == 16
    assert bits_for_vocab(151936) == 18
    assert bits_for_vocab(2) == 1
    with pytest.raises(InvalidArgumentError):
        pack_ids(np.array([4]), 2)
