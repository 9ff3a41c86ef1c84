//! Lower-case hex digits for the ids the gateway writes on every request (request ids,
//! W3C trace and span ids, their access-log fields): a byte at a time from a table, where
//! a digit at a time cost a request a few hundred instructions.

/// Every byte as its two lower-case hex digits.
static PAIRS: [[u8; 2]; 256] = {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut table = [[0u8; 2]; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = [DIGITS[b >> 4], DIGITS[b & 0xf]];
        b += 1;
    }
    table
};

/// Writes `bytes` as hex into `out`, two digits a byte, as far as both go.
pub fn encode_into(out: &mut [u8], bytes: &[u8]) {
    for (pair, &byte) in out.chunks_exact_mut(2).zip(bytes) {
        pair.copy_from_slice(&PAIRS[usize::from(byte)]);
    }
}

/// Appends `bytes` as hex to `out`.
pub fn push(out: &mut Vec<u8>, bytes: &[u8]) {
    out.reserve(2 * bytes.len());
    for &byte in bytes {
        out.extend_from_slice(&PAIRS[usize::from(byte)]);
    }
}

/// `n` as 32 hex digits.
pub fn u128_digits(n: u128) -> [u8; 32] {
    let mut text = [0u8; 32];
    encode_into(&mut text, &n.to_be_bytes());
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_are_those_of_format() {
        for n in [
            0u128,
            1,
            0xdead_beef,
            u128::MAX,
            0x0123_4567_89ab_cdef_fedc_ba98_7654_3210,
        ] {
            assert_eq!(u128_digits(n).as_slice(), format!("{n:032x}").as_bytes());
            let mut out = Vec::new();
            push(&mut out, &n.to_be_bytes()[8..]);
            assert_eq!(out, format!("{:016x}", n as u64).as_bytes());
        }
    }
}
