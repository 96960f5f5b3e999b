import numpy as np
import pytest

from quipc_runtime.packing import pack, packed_row_bytes, unpack


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("n", [1, 8, 13, 576, 1536])
def test_round_trip(bits, n):
    codes = np.random.default_rng(bits * n).integers(0, 1 << bits, (7, n))
    packed = pack(codes, bits)
    assert packed.dtype == np.uint8 and packed.shape == (7, packed_row_bytes(n, bits))
    np.testing.assert_array_equal(unpack(packed, bits, n), codes)


def test_dense_sizes():
    # 2-bit: 4 codes per byte; 3-bit: 8 codes in 3 bytes (not 4-bit containers); 4-bit: 2 per byte
    assert packed_row_bytes(576, 2) == 144
    assert packed_row_bytes(576, 3) == 216
    assert packed_row_bytes(576, 4) == 288


def test_layout_is_little_endian_bitstream():
    codes = np.array([[1, 2, 3, 0, 1, 2, 3, 0]])
    assert pack(codes, 2).tolist() == [[0b00111001, 0b00111001]]
    assert pack(np.array([[5, 0, 0, 0, 0, 0, 0, 7]]), 3).tolist() == [[5, 0, 7 << 5]]
    assert pack(np.array([[1, 15]]), 4).tolist() == [[0xF1, 0, 0, 0]]


def test_bad_input():
    with pytest.raises(ValueError, match="unsupported bit width"):
        pack(np.zeros((1, 8)), 5)
    with pytest.raises(ValueError, match="out of range"):
        pack(np.full((1, 8), 4), 2)
    with pytest.raises(ValueError, match="expected"):
        unpack(np.zeros((1, 3), np.uint8), 2, 16)
