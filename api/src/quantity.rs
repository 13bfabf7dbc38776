//! Kubernetes resource quantities (`1500m`, `1Gi`, `1e9`, `0.5`), parsed exactly.
//!
//! The grammar is Kubernetes' (`k8s.io/apimachinery/pkg/api/resource`):
//!
//! ```text
//! quantity        ::= signedNumber suffix
//! signedNumber    ::= number | sign number          sign ::= "+" | "-"
//! number          ::= digits | digits "." digits | digits "." | "." digits
//! suffix          ::= binarySI | decimalExponent | decimalSI
//! binarySI        ::= Ki | Mi | Gi | Ti | Pi | Ei
//! decimalSI       ::= n | u | m | "" | k | M | G | T | P | E
//! decimalExponent ::= ("e" | "E") signedNumber     (an integer exponent)
//! ```
//!
//! A value is kept as `digits × 2^exp2 × 10^exp10` with no rounding, so `0.1` and `100m` are
//! the same number. Conversions round up, as Kubernetes' `Value()` and `MilliValue()` do.
//! Limits are never negative: a leading `-` is refused.

use std::fmt;

/// The longest quantity string accepted (Kubernetes quantities are short; this bounds work).
pub const MAX_QUANTITY_LEN: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QuantityError {
    #[error("empty quantity")]
    Empty,
    #[error("quantity is longer than {MAX_QUANTITY_LEN} characters")]
    TooLong,
    #[error("'{0}' is negative: a limit must be zero or more")]
    Negative(String),
    #[error("'{quantity}' is not a Kubernetes quantity: {reason}")]
    Malformed {
        quantity: String,
        reason: &'static str,
    },
    #[error("'{0}' is too large")]
    TooLarge(String),
}

/// A non-negative quantity: `digits × 2^exp2 × 10^exp10`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quantity {
    digits: u128,
    exp2: u32,
    exp10: i32,
}

/// Exponents beyond this are refused outright (the value could not fit any limit anyway).
const MAX_EXPONENT: i32 = 1000;

impl Quantity {
    pub fn parse(s: &str) -> Result<Self, QuantityError> {
        if s.is_empty() {
            return Err(QuantityError::Empty);
        }
        if s.len() > MAX_QUANTITY_LEN {
            return Err(QuantityError::TooLong);
        }
        let malformed = |reason| QuantityError::Malformed {
            quantity: s.to_string(),
            reason,
        };
        let (negative, rest) = match s.as_bytes()[0] {
            b'-' => (true, &s[1..]),
            b'+' => (false, &s[1..]),
            _ => (false, s),
        };
        // The number: digits with at most one decimal point.
        let number_len = rest
            .bytes()
            .take_while(|b| b.is_ascii_digit() || *b == b'.')
            .count();
        let (number, suffix) = rest.split_at(number_len);
        if !number.bytes().any(|b| b.is_ascii_digit()) {
            return Err(malformed("expected a number (like 1, 0.5, 1500m or 1Gi)"));
        }
        let (int_part, frac_part) = match number.split_once('.') {
            Some((_, f)) if f.contains('.') => return Err(malformed("more than one '.'")),
            Some((i, f)) => (i, f),
            None => (number, ""),
        };
        let too_large = || QuantityError::TooLarge(s.to_string());
        let mut digits: u128 = 0;
        for b in int_part.bytes().chain(frac_part.bytes()) {
            digits = digits
                .checked_mul(10)
                .and_then(|d| d.checked_add(u128::from(b - b'0')))
                .ok_or_else(too_large)?;
        }
        // At most 64 characters, so the fraction has fewer than 64 digits.
        let mut exp10 = -(frac_part.len() as i32);
        let mut exp2 = 0;
        match suffix {
            "" => {}
            "Ki" => exp2 = 10,
            "Mi" => exp2 = 20,
            "Gi" => exp2 = 30,
            "Ti" => exp2 = 40,
            "Pi" => exp2 = 50,
            "Ei" => exp2 = 60,
            "n" => exp10 -= 9,
            "u" => exp10 -= 6,
            "m" => exp10 -= 3,
            "k" => exp10 += 3,
            "M" => exp10 += 6,
            "G" => exp10 += 9,
            "T" => exp10 += 12,
            "P" => exp10 += 15,
            "E" => exp10 += 18,
            _ if suffix.starts_with(['e', 'E']) => {
                let exp = &suffix[1..];
                let unsigned = exp.strip_prefix(['+', '-']).unwrap_or(exp);
                if unsigned.is_empty() || !unsigned.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(malformed("an exponent must be a whole number, as in 1e9"));
                }
                let e: i32 = exp
                    .parse()
                    .ok()
                    .filter(|e: &i32| e.abs() <= MAX_EXPONENT)
                    .ok_or_else(|| malformed("exponent out of range (at most 1000 either way)"))?;
                exp10 += e;
            }
            _ => {
                return Err(malformed(
                    "unknown suffix (expected one of n u m k M G T P E Ki Mi Gi Ti Pi Ei, or an exponent like e9)",
                ))
            }
        }
        // Even "-0": a minus sign on a limit is a mistake worth reporting.
        if negative {
            return Err(QuantityError::Negative(s.to_string()));
        }
        Ok(Quantity {
            digits,
            exp2,
            exp10,
        })
    }

    /// The value × 10^`scale`, rounded up to a whole number; `None` if it does not fit.
    fn scaled_ceil(&self, scale: i32) -> Option<u128> {
        if self.digits == 0 {
            return Some(0);
        }
        let n = self.digits.checked_mul(1u128 << self.exp2)?;
        let e = self.exp10 + scale;
        if e >= 0 {
            n.checked_mul(10u128.checked_pow(e as u32)?)
        } else {
            match 10u128.checked_pow(e.unsigned_abs()) {
                Some(d) => Some(n.div_ceil(d)),
                // Smaller than one unit (and positive): rounds up to one.
                None => Some(1),
            }
        }
    }

    /// The value in thousandths, rounded up (Kubernetes' `MilliValue`): CPU in millicores.
    pub fn milli_ceil(&self) -> Option<u128> {
        self.scaled_ceil(3)
    }

    /// The value rounded up to a whole number (Kubernetes' `Value`): memory in bytes.
    pub fn value_ceil(&self) -> Option<u128> {
        self.scaled_ceil(0)
    }

    pub fn is_zero(&self) -> bool {
        self.digits == 0
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.digits)?;
        if self.exp2 != 0 {
            write!(f, "*2^{}", self.exp2)?;
        }
        if self.exp10 != 0 {
            write!(f, "e{}", self.exp10)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(s: &str) -> u128 {
        Quantity::parse(s)
            .unwrap_or_else(|e| panic!("{s}: {e}"))
            .value_ceil()
            .unwrap()
    }

    fn millis(s: &str) -> u128 {
        Quantity::parse(s)
            .unwrap_or_else(|e| panic!("{s}: {e}"))
            .milli_ceil()
            .unwrap()
    }

    #[test]
    fn plain_and_decimal_numbers() {
        assert_eq!(bytes("0"), 0);
        assert_eq!(bytes("1"), 1);
        assert_eq!(bytes("+5"), 5);
        assert_eq!(bytes("1048576"), 1 << 20);
        assert_eq!(millis("1.5"), 1500);
        assert_eq!(millis("0.5"), 500);
        assert_eq!(millis(".5"), 500);
        assert_eq!(millis("2."), 2000);
        assert_eq!(millis("007"), 7000);
        assert_eq!(bytes("1.5"), 2, "1.5 bytes rounds up");
    }

    #[test]
    fn decimal_si_suffixes() {
        assert_eq!(millis("1500m"), 1500);
        assert_eq!(millis("100m"), 100);
        assert_eq!(millis("1m"), 1);
        assert_eq!(millis("1u"), 1, "a millionth of a core rounds up to 1m");
        assert_eq!(millis("1n"), 1);
        assert_eq!(bytes("1k"), 1_000);
        assert_eq!(bytes("1M"), 1_000_000);
        assert_eq!(bytes("1G"), 1_000_000_000);
        assert_eq!(bytes("1T"), 1_000_000_000_000);
        assert_eq!(bytes("1P"), 1_000_000_000_000_000);
        assert_eq!(bytes("1E"), 1_000_000_000_000_000_000);
        assert_eq!(bytes("1.5G"), 1_500_000_000);
        assert_eq!(bytes("500m"), 1, "half a byte rounds up");
    }

    #[test]
    fn binary_si_suffixes() {
        assert_eq!(bytes("1Ki"), 1 << 10);
        assert_eq!(bytes("1Mi"), 1 << 20);
        assert_eq!(bytes("1Gi"), 1 << 30);
        assert_eq!(bytes("1Ti"), 1 << 40);
        assert_eq!(bytes("1Pi"), 1 << 50);
        assert_eq!(bytes("1Ei"), 1 << 60);
        assert_eq!(bytes("1.5Gi"), 3 << 29);
        assert_eq!(bytes("0.5Ki"), 512);
        assert_eq!(bytes("512Mi"), 512 << 20);
    }

    #[test]
    fn exponents() {
        assert_eq!(bytes("1e9"), 1_000_000_000);
        assert_eq!(bytes("1E9"), 1_000_000_000);
        assert_eq!(bytes("1e+3"), 1_000);
        assert_eq!(millis("1e-3"), 1);
        assert_eq!(millis("15e-1"), 1500);
        assert_eq!(bytes("2.5e3"), 2_500);
        assert_eq!(bytes("1e0"), 1);
        assert_eq!(millis("1e-999"), 1, "tiny but positive rounds up");
        assert_eq!(bytes("0e999"), 0);
    }

    #[test]
    fn malformed_quantities() {
        for bad in [
            "", "abc", "m", "Gi", ".", "1..5", "1.2.3", "1GB", "1gi", "1KI", "1K", "1mi", "1 Gi",
            " 1", "1 ", "1e", "1e+", "1e1.5", "1ee3", "1Gi5", "0x10", "1_000", "1,5", "∞", "NaN",
            "1e9Gi", "++1", "+-1", "1%",
        ] {
            let err = Quantity::parse(bad).expect_err(bad);
            assert!(
                matches!(err, QuantityError::Malformed { .. } | QuantityError::Empty),
                "{bad}: {err}"
            );
        }
        let err = Quantity::parse("1GB").unwrap_err().to_string();
        assert!(err.contains("1GB") && err.contains("suffix"), "{err}");
    }

    #[test]
    fn negative_quantities() {
        for bad in ["-1", "-500m", "-1Gi", "-0.5", "-1e3", "-0"] {
            assert_eq!(
                Quantity::parse(bad),
                Err(QuantityError::Negative(bad.into())),
                "{bad}"
            );
        }
        assert!(Quantity::parse("-1Gi")
            .unwrap_err()
            .to_string()
            .contains("negative"));
    }

    #[test]
    fn overflow_and_absurd_values() {
        // Too many digits for 128 bits.
        let huge = "9".repeat(40);
        assert_eq!(
            Quantity::parse(&huge),
            Err(QuantityError::TooLarge(huge.clone()))
        );
        for bad in ["1e99999", "1e-99999", "1e99999999999999999999"] {
            let err = Quantity::parse(bad).unwrap_err().to_string();
            assert!(err.contains("exponent out of range"), "{bad}: {err}");
        }
        // Parses, but does not fit when converted.
        assert_eq!(Quantity::parse("1e40").unwrap().value_ceil(), None);
        assert_eq!(Quantity::parse("1e38").unwrap().milli_ceil(), None);
        let big = format!("{}Ei", "9".repeat(30));
        assert_eq!(Quantity::parse(&big).unwrap().value_ceil(), None);
        assert_eq!(
            Quantity::parse(&"1".repeat(65)),
            Err(QuantityError::TooLong)
        );
    }
}
