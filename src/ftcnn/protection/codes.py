"""Stored-word codes: SEC-DED ECC, parity and weight-level TMR, checked at use (issue 21).

The memory-fault baselines a reviewer expects (design §4b), built as memory that
a campaign attacks like any other: a coded Conv2d/Linear keeps its float32
``weight`` and ``bias`` (the data, same fault-target names) and adds the code's
words as int32 buffers (``weight_code``, ``bias_code``) that it declares as raw
stored words (``fault_words``, see :func:`ftcnn.injection.graph.protection_buffers`), so the
one fault space attacks every stored bit of them at the same BER. At every
forward the layer decodes its values from data + code words in a few vectorised
integer passes (no Python loop over weights), then runs the usual call (and the
weight check, if any: decode first, then the bounds).

Codes (``CODES``):

- ``secded``: SEC-DED (72,64) emulated on 64-bit words, i.e. pairs of
  consecutive float32 values of a tensor (an odd tail is padded with a zero
  that is not stored). 8 check bits per word, packed 4 words' worth per int32
  (x1.125 memory): a Hamming code over the 64 data bits (7 bits of syndrome)
  plus an overall parity bit. At use: a single flip (in the data or the check
  bits) is corrected; a double flip is detected and the word (both values)
  zeroed; a syndrome no single flip gives (3+ flips) is zeroed too.
- ``parity``: one parity bit per weight over all 32 bits, packed 32 per int32
  word (x1.031); a failed check zeroes the weight.
- ``parity_exponent``: one parity bit per weight over its sign and exponent
  (bits 23-31) only; a failed check zeroes the weight, a mantissa flip is
  neither detected nor acted on (it moves the weight by less than a factor of 2).
  Measured on LeNet-5/mnist5k (clean 96.80%, 200 trials per cell, every stored
  bit attacked; experiments/results/memory_codes.md): at BER 1e-3 zeroing every
  weight that fails a full parity check (~3% of them) gives 49.8%, the
  sign+exponent check 76.3% (bounds alone: 93.3%); at 1e-4, 96.4% vs 96.9%. So
  ``parity_exponent`` is the one to use; ``parity`` stays as the baseline the
  issue names. With the weight check behind it (decode first, then the
  bounds), ``parity_exponent`` gives 96.0% at 1e-3 for x1.047 memory, and
  ``secded`` 96.7% for x1.141 (alone 92.9%: at 1e-3 a few words per trial take
  three flips, which SEC-DED can miscorrect into a huge value).
- ``tmr3``: weight-level TMR, the weight plus two stored copies (int32 words,
  all three attacked), bitwise majority ``(a & (b | c)) | (b & c)`` at use: a
  value is wrong only where two copies lost the same bit (x3 memory).

The coded layers themselves (``CodedConv2d``, ``CodedLinear``, ``coded_layer``) live in
``ftcnn.protection.hardening`` beside the other protected layers they extend; this module is the bit
arithmetic and the registry, and imports no other ftcnn module.

Fault-free, every decode returns the stored bits unchanged, so a coded model
computes exactly what the uncoded one does (tested bit for bit). Only float32
storage carries codes (``faults.parameter_memory`` refuses another ``--dtype``):
the words encode float32 bits.
"""

from __future__ import annotations

from typing import Any

import torch


WORD_BITS = 32


# --- bit tricks on integer tensors ---------------------------------------------
# Every op a decode runs takes its sizes as Python ints and its constants as Python scalars (no
# ``numel()`` branches, no constant tensors): torch.fx then traces a coded layer's forward, so the
# campaign shortcut can prove it writes nothing and start trials right at the layer.

def parity(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Parity (0/1) of each ``bits``-bit integer element (int32: 32, int64: 64): XOR folding
    by halves. An arithmetic shift only pollutes bits above those the next fold reads."""
    shift = bits // 2
    while shift:
        x = x ^ (x >> shift)
        shift //= 2
    return x & 1


def _wrap32(x: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) as the int32 with the same 32 bits (sign-extended first, so the
    conversion is exact)."""
    return ((x << 32) >> 32).to(torch.int32)


def pack_bits(fields: torch.Tensor, per_value: int) -> torch.Tensor:
    """``per_value``-bit fields (int64, each < 2^per_value) packed low end first into int32
    words, ``32 // per_value`` per word (the last word zero-padded)."""
    per_word = WORD_BITS // per_value
    pad = (-fields.numel()) % per_word
    rows = torch.cat([fields.reshape(-1), fields.new_zeros(pad)]).reshape(-1, per_word)
    shifts = torch.arange(per_word, device=fields.device, dtype=torch.int64) * per_value
    return _wrap32((rows << shifts).sum(1))


def unpack_bits(words: torch.Tensor, per_value: int, n: int) -> torch.Tensor:
    """The first ``n`` ``per_value``-bit fields of int32 ``words`` (``pack_bits`` reversed), int64."""
    wide = words.to(torch.int64)
    field = (1 << per_value) - 1
    rows = torch.stack([(wide >> (k * per_value)) & field for k in range(WORD_BITS // per_value)], 1)
    return rows.reshape(-1)[:n]


def _signed(value: int, bits: int) -> int:
    """The two's-complement signed value of a ``bits``-bit pattern."""
    return value - (1 << bits) if value >= 1 << (bits - 1) else value


# --- the codes -------------------------------------------------------------------

class Code:
    """One stored-word code: ``encode`` (fault-free float32 values -> int32 code words),
    ``decode`` (stored values + words -> the values to use, same shape, a new tensor; ``n``
    the number of values, given when known so the decode runs no size query),
    ``words(n)`` (code words stored for ``n`` values), ``bits_per_value`` (stored bits per
    value, data included, for the memory ratio) and ``ops_per_value`` (integer passes per
    value per decode, for ``ftcnn.protection.cost``: run once per forward, shared by the batch)."""

    name: str = ""
    description: str = ""
    bits_per_value: float = WORD_BITS
    ops_per_value: int = 0

    def words(self, n: int) -> int:
        raise NotImplementedError

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, values: torch.Tensor, words: torch.Tensor, n: int | None = None) -> torch.Tensor:
        raise NotImplementedError


# The 7-bit Hamming column of each of the 64 data bits: positions 3..71 that are not powers of
# two (those are the check bits' own columns), as in the (72,64) Hamming code. Position p holds
# data bit p - 2 - floor(log2 p), which is how a syndrome is turned back into a data bit.
DATA_POSITIONS = [p for p in range(3, 72) if p & (p - 1)]
SYNDROME_MASKS = [_signed(sum(1 << i for i, p in enumerate(DATA_POSITIONS) if p >> j & 1), 64) for j in range(7)]


class SecDed(Code):
    """SEC-DED (72,64) on pairs of float32 values (see the module doc)."""

    name = "secded"
    description = "SEC-DED (72,64) ECC per pair of values: corrects one flip, zeroes a word with two"
    bits_per_value = 36.0
    # passes per 64-bit word, counted from the code below: forming it (5), the 7 Hamming bits
    # (110: a mask and a 13-pass parity each, merged), the data parity (13), the check byte
    # (3 to unpack, 2 to mask and compare, 7 for its parity), the syndrome to a data bit (25),
    # correct-or-zero (17) and splitting the word (5): ~187 per word, 93 per value
    ops_per_value = 93

    def words(self, n: int) -> int:
        return -(-(-(-n // 2)) // 4)  # ceil(ceil(n / 2) / 4): one check byte per pair, 4 per word

    @staticmethod
    def data_words(values: torch.Tensor, n: int | None = None) -> torch.Tensor:
        """The 64-bit words: value 2k in the low half, 2k+1 in the high half (int64)."""
        flat = values.reshape(-1).view(torch.int32)
        if (values.numel() if n is None else n) % 2:
            flat = torch.cat([flat, flat.new_zeros(1)])
        low = flat[0::2].to(torch.int64) & 0xFFFFFFFF
        return low | (flat[1::2].to(torch.int64) << 32)

    @staticmethod
    def hamming_bits(data: torch.Tensor) -> torch.Tensor:
        """The 7 Hamming check bits of each 64-bit data word, as one int64 each."""
        out = parity(data & SYNDROME_MASKS[0], 64)
        for j in range(1, 7):
            out = out | (parity(data & SYNDROME_MASKS[j], 64) << j)
        return out

    def check_bytes(self, data: torch.Tensor) -> torch.Tensor:
        """Check byte per word: 7 Hamming bits, then bit 7 the overall parity, which makes
        the parity of all 72 bits even."""
        hamming = self.hamming_bits(data)
        return hamming | ((parity(data, 64) ^ parity(hamming, 8)) << 7)

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        return pack_bits(self.check_bytes(self.data_words(values)), 8)

    def decode_words(self, data: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
        """Corrected 64-bit ``data`` words given their stored check bytes (int64): one flip
        fixed; a double flip, or a syndrome no single flip gives, zeroes the word."""
        syndrome = self.hamming_bits(data) ^ (stored & 0x7F)
        odd = parity(data, 64) ^ parity(stored, 8)  # 1: an odd number of flips in the 72 bits
        in_data = (syndrome & (syndrome - 1)) != 0   # not 0 and not a check bit's own column
        log2 = sum((syndrome >= 1 << k).long() for k in range(1, 7))
        bit = syndrome - 2 - log2                    # the data bit at that position (>= 64: none)
        fixable = odd * in_data * (bit < 64)
        bad = (1 - odd) * (syndrome != 0) + odd * in_data * (bit >= 64)
        fixed = data ^ ((1 << bit.clamp(0, 63)) & -fixable)  # int64: 1 << 63 is the sign bit
        return fixed & (bad - 1)                     # bad: every bit cleared (+0.0, +0.0)

    def decode(self, values: torch.Tensor, words: torch.Tensor, n: int | None = None) -> torch.Tensor:
        n = values.numel() if n is None else n
        data = self.data_words(values, n)
        fixed = self.decode_words(data, unpack_bits(words, 8, (n + 1) // 2))
        halves = torch.stack([(fixed << 32) >> 32, fixed >> 32], 1).to(torch.int32)
        return halves.reshape(-1)[:n].view(torch.float32).reshape(values.shape)


class Parity(Code):
    """A parity bit per value over the bits of ``mask``, packed 32 per int32 word; a value
    whose check fails is zeroed."""

    bits_per_value = WORD_BITS + 1
    ops_per_value = 19  # mask, a 12-pass parity, widen, unpack (~2), compare, narrow, keep mask, and

    def __init__(self, name: str, mask: int, description: str) -> None:
        self.name, self.description = name, description
        self.mask = _signed(mask, 32)

    def words(self, n: int) -> int:
        return -(-n // WORD_BITS)

    def bits(self, values: torch.Tensor) -> torch.Tensor:
        return parity(values.reshape(-1).view(torch.int32) & self.mask, 32).to(torch.int64)

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        return pack_bits(self.bits(values), 1)

    def decode(self, values: torch.Tensor, words: torch.Tensor, n: int | None = None) -> torch.Tensor:
        n = values.numel() if n is None else n
        failed = (self.bits(values) ^ unpack_bits(words, 1, n)).to(torch.int32)
        kept = values.reshape(-1).view(torch.int32) & (failed - 1)  # failed: 0 (+0.0)
        return kept.view(torch.float32).reshape(values.shape)


class Tmr3(Code):
    """The value plus two stored int32 copies, bitwise majority at use."""

    name = "tmr3"
    description = "weight-level TMR: two stored copies, bitwise majority of the three at use"
    bits_per_value = 3 * WORD_BITS
    ops_per_value = 4  # (a & (b | c)) | (b & c)

    def words(self, n: int) -> int:
        return 2 * n

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        return values.reshape(-1).view(torch.int32).repeat(2)

    def decode(self, values: torch.Tensor, words: torch.Tensor, n: int | None = None) -> torch.Tensor:
        n = values.numel() if n is None else n
        a = values.reshape(-1).view(torch.int32)
        b, c = words[:n], words[n:]
        return ((a & (b | c)) | (b & c)).view(torch.float32).reshape(values.shape)


CODES: dict[str, Code] = {code.name: code for code in (
    SecDed(),
    Parity("parity", 0xFFFFFFFF, "a parity bit per value over all its bits; a failed check zeroes it"),
    Parity("parity_exponent", 0xFF800000, "a parity bit per value over its sign and exponent (bits 23-31); "
           "a failed check zeroes it, mantissa flips are left alone"),
    Tmr3(),
)}


def code(name: Any) -> Code:
    """The registered code called ``name``, or a one-line error naming the choices."""
    if not isinstance(name, str) or name not in CODES:
        raise ValueError(f"unknown code {str(name)[:60]!r}; choose from {', '.join(CODES)}")
    return CODES[name]
