//! Nix's base-32 encoding ("nixbase32"), used for store path hash parts and
//! for hashes in narinfo files.
//!
//! It is not RFC 4648 base32: the alphabet is `0123456789abcdfghijklmnpqrsvwxyz`
//! (no `e`, `o`, `t`, `u`), there is no padding, and the string starts with
//! the most significant 5-bit group of the byte string read as a little-endian
//! number (so the last byte is encoded first). `n` bytes give `ceil(8n / 5)`
//! characters: 20 bytes give 32, 32 bytes give 52.

/// The 32 characters of the alphabet, in value order.
pub const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// A string that is not the nixbase32 encoding of any byte string (of the
/// expected length).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Nixbase32Error {
    /// A character outside the alphabet.
    #[error("invalid nixbase32 character {character:?} at position {position}")]
    InvalidCharacter {
        /// The offending character.
        character: char,
        /// Its byte offset in the input.
        position: usize,
    },
    /// No byte string encodes to this many characters.
    #[error("invalid nixbase32 length {0}: no byte string encodes to this many characters")]
    InvalidLength(usize),
    /// The encoding has the right form but a different length than required.
    #[error("nixbase32 string of {actual} characters decodes to {actual_bytes} bytes, expected {expected} bytes")]
    WrongLength {
        /// Characters in the input.
        actual: usize,
        /// Bytes it decodes to.
        actual_bytes: usize,
        /// Bytes the caller required.
        expected: usize,
    },
    /// The first character carries bits beyond the decoded length (a
    /// non-canonical encoding).
    #[error("non-canonical nixbase32: the first character has padding bits set")]
    NonZeroPadding,
}

/// Number of characters the encoding of `n` bytes has: `ceil(8n / 5)`.
pub const fn encode_len(n: usize) -> usize {
    (n * 8).div_ceil(5)
}

/// Number of bytes a string of `len` characters decodes to, or `None` if no
/// byte string encodes to exactly `len` characters.
pub const fn decode_len(len: usize) -> Option<usize> {
    let n = len * 5 / 8;
    if encode_len(n) == len {
        Some(n)
    } else {
        None
    }
}

/// Encodes `input` as nixbase32.
pub fn encode(input: &[u8]) -> String {
    let len = encode_len(input.len());
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        // The 5 bits starting at bit `b` of the input read as a little-endian number.
        let low = input[i] >> j;
        let high = if j > 3 {
            // `j > 3` means the group crosses into the next byte; for the last
            // byte the missing high bits are zero.
            input.get(i + 1).map_or(0, |&next| next << (8 - j))
        } else {
            0
        };
        out.push(ALPHABET[((low | high) & 0x1f) as usize] as char);
    }
    out
}

fn digit_value(c: u8) -> Option<u8> {
    ALPHABET.iter().position(|&a| a == c).map(|p| p as u8)
}

/// Decodes a nixbase32 string. Rejects characters outside the alphabet,
/// lengths no byte string encodes to, and set padding bits, so every accepted
/// string is the canonical encoding of its result (`encode(decode(s)?) == s`).
pub fn decode(input: &str) -> Result<Vec<u8>, Nixbase32Error> {
    let s = input.as_bytes();
    let n = decode_len(s.len()).ok_or(Nixbase32Error::InvalidLength(s.len()))?;
    if let Some((position, character)) = input
        .char_indices()
        .find(|&(_, c)| !c.is_ascii() || digit_value(c as u8).is_none())
    {
        return Err(Nixbase32Error::InvalidCharacter {
            character,
            position,
        });
    }
    let mut out = vec![0u8; n];
    for (k, &c) in s.iter().rev().enumerate() {
        // Checked above: every byte is in the alphabet.
        let digit = digit_value(c).unwrap_or(0);
        let b = k * 5;
        let i = b / 8;
        let j = b % 8;
        out[i] |= digit << j;
        let carry = (u16::from(digit) << j) >> 8;
        if i + 1 < n {
            out[i + 1] |= carry as u8;
        } else if carry != 0 {
            return Err(Nixbase32Error::NonZeroPadding);
        }
    }
    Ok(out)
}

/// Decodes a nixbase32 string that must encode exactly `N` bytes.
pub fn decode_fixed<const N: usize>(input: &str) -> Result<[u8; N], Nixbase32Error> {
    if input.len() != encode_len(N) {
        return Err(match decode_len(input.len()) {
            Some(actual_bytes) => Nixbase32Error::WrongLength {
                actual: input.len(),
                actual_bytes,
                expected: N,
            },
            None => Nixbase32Error::InvalidLength(input.len()),
        });
    }
    let v = decode(input)?;
    let mut out = [0u8; N];
    out.copy_from_slice(&v);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        data_encoding::HEXLOWER
            .decode(s.as_bytes())
            .expect("test hex")
    }

    /// Vectors printed by Nix 2.8:
    /// `nix-hash --type <algo> --to-base32 <hex>` and
    /// `nix-hash --type sha256 [--flat] [--base32] <file>` (both encodings of one file).
    const NIX_VECTORS: &[(&str, &str)] = &[
        // nix-hash --type sha1 --to-base32 0000000000000000000000000000000000000000
        ("0000000000000000000000000000000000000000", "00000000000000000000000000000000"),
        // nix-hash --type sha1 --to-base32 ffffffffffffffffffffffffffffffffffffffff
        ("ffffffffffffffffffffffffffffffffffffffff", "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz"),
        // nix-hash --type sha1 --to-base32 000102030405060708090a0b0c0d0e0f10111213
        ("000102030405060708090a0b0c0d0e0f10111213", "2c91240g1q6hq2qa1440f1h50h1h4080"),
        // nix-hash --type md5 --to-base32 000102030405060708090a0b0c0d0e0f
        ("000102030405060708090a0b0c0d0e0f", "0g1q6hq2qa1440f1h50h1h4080"),
        // nix-hash --type sha256 --to-base32 000102…1e1f
        (
            "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
            "07qy3lf1n6hr30bic58l2c91240g1q6hq2qa1440f1h50h1h4080",
        ),
        // printf 'hello\n' > hello.txt; nix-hash --type sha256 hello.txt / --base32 (NAR hash)
        (
            "1c37d01af40be2e80691de3cc3df44377a699afbb17c68f080964b2fd071fc13",
            "04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw",
        ),
        // nix-hash --type sha256 --flat hello.txt / --flat --base32
        (
            "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03",
            "00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq",
        ),
        // nix-hash --type sha1 --flat hello.txt / --flat --base32
        ("f572d396fae9206628714fb2ce00f72e94f2258f", "iwjz551fyw0cxcjgf4l6c879zabd6wpm"),
        // nix-hash --type md5 --flat hello.txt / --flat --base32
        ("b1946ac92492d2347c6235b4d2611184", "4425hx5d1mc9y39llj4k4nm55i"),
        // nix-hash --type sha512 --flat hello.txt / --flat --base32
        (
            "e7c22b994c59d9cf2b48e549b1e24666636045930d3da7c1acb299d1c3b7f931f94aae41edda2c2b207a36e10f8bcb8d45223e54878f5b316e7ce3b6bc019629",
            "0lrc0dwnvipqviibf7qfm1y492qvjwb1zhkcyi05cndmva1mr5gjcgrnz1x36djmk0sfg8djd2n0qv68vib2jg590mwznar9jcjphp7",
        ),
    ];

    #[test]
    fn matches_nix_vectors_both_ways() {
        for (hex, b32) in NIX_VECTORS {
            let bytes = unhex(hex);
            assert_eq!(encode(&bytes), *b32, "encode {hex}");
            assert_eq!(decode(b32).unwrap(), bytes, "decode {b32}");
        }
    }

    #[test]
    fn lengths() {
        assert_eq!(encode_len(0), 0);
        assert_eq!(encode_len(1), 2);
        assert_eq!(encode_len(16), 26);
        assert_eq!(encode_len(20), 32);
        assert_eq!(encode_len(32), 52);
        assert_eq!(encode_len(64), 103);
        for n in 0..200 {
            assert_eq!(decode_len(encode_len(n)), Some(n), "n = {n}");
        }
        // Lengths no byte string encodes to.
        for len in [1usize, 3, 6, 9, 11, 33, 51] {
            assert_eq!(decode_len(len), None, "len = {len}");
        }
    }

    #[test]
    fn empty() {
        assert_eq!(encode(&[]), "");
        assert_eq!(decode("").unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn single_bytes() {
        // One byte = two characters: high 3 bits, then low 5 bits.
        assert_eq!(encode(&[0x00]), "00");
        assert_eq!(encode(&[0x1f]), "0z");
        assert_eq!(encode(&[0x20]), "10");
        assert_eq!(encode(&[0xff]), "7z");
        for b in 0..=255u8 {
            assert_eq!(decode(&encode(&[b])).unwrap(), vec![b]);
        }
    }

    #[test]
    fn round_trips_all_lengths() {
        for n in 0..100usize {
            let data: Vec<u8> = (0..n)
                .map(|i| (i as u8).wrapping_mul(37).wrapping_add(11))
                .collect();
            let s = encode(&data);
            assert_eq!(s.len(), encode_len(n));
            assert_eq!(decode(&s).unwrap(), data);
        }
    }

    #[test]
    fn rejects_invalid_characters() {
        for bad in ['e', 'o', 't', 'u', 'A', 'Z', '-', ' ', '_'] {
            let mut s = "04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw".to_string();
            s.replace_range(10..11, &bad.to_string());
            assert_eq!(
                decode(&s),
                Err(Nixbase32Error::InvalidCharacter {
                    character: bad,
                    position: 10
                }),
                "{bad:?}"
            );
        }
        // A multi-byte character is reported whole.
        let err = decode("é0").unwrap_err();
        assert!(matches!(err, Nixbase32Error::InvalidLength(3)), "{err:?}");
        let err = decode("0000000000000000000000000000000é").unwrap_err();
        assert!(matches!(err, Nixbase32Error::InvalidLength(33)), "{err:?}");
        let err = decode("000000000000000000000000000000é").unwrap_err();
        assert_eq!(
            err,
            Nixbase32Error::InvalidCharacter {
                character: 'é',
                position: 30
            }
        );
    }

    #[test]
    fn rejects_non_canonical_lengths() {
        assert_eq!(decode("0"), Err(Nixbase32Error::InvalidLength(1)));
        assert_eq!(decode("000"), Err(Nixbase32Error::InvalidLength(3)));
        assert_eq!(
            decode(&"0".repeat(33)),
            Err(Nixbase32Error::InvalidLength(33))
        );
        assert_eq!(
            decode(&"0".repeat(51)),
            Err(Nixbase32Error::InvalidLength(51))
        );
    }

    #[test]
    fn rejects_padding_bits() {
        // 1 byte: the first character holds 3 bits, so only 0..=7 are canonical.
        assert_eq!(decode("8z"), Err(Nixbase32Error::NonZeroPadding));
        assert_eq!(decode("z0"), Err(Nixbase32Error::NonZeroPadding));
        assert_eq!(decode("70").unwrap(), vec![0xe0]);
        // 20 bytes = 160 bits = exactly 32 characters: no padding bits.
        assert_eq!(decode("z".repeat(32).as_str()).unwrap(), vec![0xff; 20]);
        // 32 bytes = 256 bits in 52 characters: the first holds only 1 bit.
        let max = format!("1{}", "z".repeat(51));
        assert_eq!(decode(&max).unwrap(), vec![0xff; 32]);
        let over = format!("2{}", "z".repeat(51));
        assert_eq!(decode(&over), Err(Nixbase32Error::NonZeroPadding));
    }

    #[test]
    fn decode_fixed_checks_length() {
        let d: [u8; 20] = decode_fixed("2c91240g1q6hq2qa1440f1h50h1h4080").unwrap();
        assert_eq!(
            d.to_vec(),
            unhex("000102030405060708090a0b0c0d0e0f10111213")
        );
        assert_eq!(
            decode_fixed::<20>("0g1q6hq2qa1440f1h50h1h4080"),
            Err(Nixbase32Error::WrongLength {
                actual: 26,
                actual_bytes: 16,
                expected: 20
            })
        );
        assert_eq!(
            decode_fixed::<20>("000"),
            Err(Nixbase32Error::InvalidLength(3))
        );
        assert!(matches!(
            decode_fixed::<20>("0000000000000000000000000000000e"),
            Err(Nixbase32Error::InvalidCharacter {
                character: 'e',
                position: 31
            })
        ));
    }
}
