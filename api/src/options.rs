//! Parsing of Cloud Hypervisor style option strings: `key=value,key=value`, and sizes.

use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OptionError {
    #[error("unknown option '{key}' (expected one of: {expected})")]
    UnknownKey { key: String, expected: String },
    #[error("option '{0}' given twice")]
    Duplicate(String),
    #[error("'{0}' is not key=value")]
    NotKeyValue(String),
    #[error("invalid value '{value}' for '{key}': {reason}")]
    InvalidValue {
        key: String,
        value: String,
        reason: String,
    },
    #[error("missing required option '{0}'")]
    Missing(String),
}

/// A parsed `key=value,...` string, checked against the keys an option accepts.
#[derive(Debug)]
pub struct OptionMap {
    values: BTreeMap<String, String>,
}

impl OptionMap {
    pub fn parse(input: &str, known: &[&str]) -> Result<Self, OptionError> {
        let mut values = BTreeMap::new();
        for part in input.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| OptionError::NotKeyValue(part.to_string()))?;
            if !known.contains(&k) {
                return Err(OptionError::UnknownKey {
                    key: k.to_string(),
                    expected: known.join(", "),
                });
            }
            if values.insert(k.to_string(), v.to_string()).is_some() {
                return Err(OptionError::Duplicate(k.to_string()));
            }
        }
        Ok(OptionMap { values })
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    /// Parses `key` with `f`, wrapping its error with the key and value.
    pub fn parse_with<T>(
        &self,
        key: &str,
        f: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Option<T>, OptionError> {
        self.get(key)
            .map(|v| {
                f(v).map_err(|reason| OptionError::InvalidValue {
                    key: key.to_string(),
                    value: v.to_string(),
                    reason,
                })
            })
            .transpose()
    }
}

/// Parses a byte size: a plain number of bytes, or one with a binary suffix K, M, G or T
/// (as Cloud Hypervisor's `--memory size=`), e.g. `512M`, `2G`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 10),
        Some((i, 'M' | 'm')) => (&s[..i], 20),
        Some((i, 'G' | 'g')) => (&s[..i], 30),
        Some((i, 'T' | 't')) => (&s[..i], 40),
        Some(_) => (s, 0),
        None => return Err("empty size".into()),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err("expected a number of bytes, optionally with a K, M, G or T suffix".into());
    }
    let n: u64 = digits.parse().map_err(|_| "number too large".to_string())?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| "size too large".to_string())
}

/// Parses a positive count (vCPUs, queues).
pub fn parse_count(s: &str) -> Result<u32, String> {
    let n: u32 = s
        .parse()
        .map_err(|_| "expected a positive whole number".to_string())?;
    if n == 0 {
        return Err("must be at least 1".into());
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("1k"), Ok(1024));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        for bad in [
            "",
            "banana",
            "G",
            "-1G",
            "1.5G",
            "1GB",
            "0x10",
            "99999999999999999999",
        ] {
            assert!(parse_size(bad).is_err(), "{bad} must not parse");
        }
        assert!(parse_size("17179869184T")
            .unwrap_err()
            .contains("too large"));
    }

    #[test]
    fn option_maps() {
        let m = OptionMap::parse("boot=2,max=2", &["boot", "max"]).unwrap();
        assert_eq!(m.get("boot"), Some("2"));
        assert_eq!(
            OptionMap::parse("boot=2,boot=3", &["boot"]).unwrap_err(),
            OptionError::Duplicate("boot".into())
        );
        assert!(matches!(
            OptionMap::parse("bogus=1", &["boot"]).unwrap_err(),
            OptionError::UnknownKey { .. }
        ));
        assert_eq!(
            OptionMap::parse("2", &["boot"]).unwrap_err(),
            OptionError::NotKeyValue("2".into())
        );
        let m = OptionMap::parse("boot=x", &["boot"]).unwrap();
        let err = m.parse_with("boot", parse_count).unwrap_err().to_string();
        assert!(err.contains("'x'") && err.contains("boot"), "{err}");
    }

    #[test]
    fn counts() {
        assert_eq!(parse_count("3"), Ok(3));
        assert!(parse_count("0").is_err());
        assert!(parse_count("-1").is_err());
        assert!(parse_count("many").is_err());
    }
}
