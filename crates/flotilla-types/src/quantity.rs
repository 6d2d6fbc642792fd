//! Kubernetes quantities: `512Mi`, `2Gi`, `500m`, `1.5G`, `1e3`, or a plain number.

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The quantities the server promises to read (and the only ones it writes): a suffix or an
/// exponent (-3 to 18) on at most 17 digits, or a plain number of up to 20 whole and 8
/// fractional digits (every 64-bit integer). Larger ones may not be representable in thousandths.
pub const PATTERN: &str = r"^\+?(([0-9]{1,17}|[0-9]{1,9}\.[0-9]{0,8}|\.[0-9]{1,8})(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei|[eE](-[1-3]|\+?(0?[0-9]|1[0-8])))|[0-9]{1,20}(\.[0-9]{0,8})?|\.[0-9]{1,8})$";

/// The binary suffixes with their powers of two, largest first.
pub const BINARY_UNITS: [(&str, u32); 6] = [
    ("Ei", 60),
    ("Pi", 50),
    ("Ti", 40),
    ("Gi", 30),
    ("Mi", 20),
    ("Ki", 10),
];

/// A non-negative quantity as the user wrote it, with its value in thousandths (to hold `500m`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quantity {
    text: String,
    milli: u128,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid quantity {0:?}: use a number with an optional suffix, such as 512Mi, 2Gi, 1G or 500m"
)]
pub struct QuantityError(pub String);

impl Quantity {
    pub fn parse(text: &str) -> Result<Self, QuantityError> {
        let err = || QuantityError(text.to_string());
        let split = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+'))
            .unwrap_or(text.len());
        let (number, suffix) = text.split_at(split);
        let number = number.strip_prefix('+').unwrap_or(number);
        if number.is_empty() || number.matches('.').count() > 1 || number == "." {
            return Err(err());
        }
        let (int_part, frac_part) = number.split_once('.').unwrap_or((number, ""));
        // value = digits / 10^frac_len * multiplier, computed exactly in thousandths.
        let digits: u128 = format!("{int_part}{frac_part}")
            .parse()
            .map_err(|_| err())?;
        let frac_len = frac_part.len() as u32;
        let (num, den): (u128, u128) = match suffix {
            "" => (1000, 1),
            "m" => (1, 1),
            "k" => (1000 * 1000, 1),
            "M" => (1000 * 1000u128.pow(2), 1),
            "G" => (1000 * 1000u128.pow(3), 1),
            "T" => (1000 * 1000u128.pow(4), 1),
            "P" => (1000 * 1000u128.pow(5), 1),
            "E" => (1000 * 1000u128.pow(6), 1),
            "Ki" => (1000 << 10, 1),
            "Mi" => (1000 << 20, 1),
            "Gi" => (1000 << 30, 1),
            "Ti" => (1000 << 40, 1),
            "Pi" => (1000 << 50, 1),
            "Ei" => (1000 << 60, 1),
            s if s.starts_with(['e', 'E']) => {
                let exp: i32 = s[1..].parse().map_err(|_| err())?;
                if !(-3..=18).contains(&exp) {
                    return Err(err());
                }
                if exp >= 0 {
                    (1000 * 10u128.pow(exp as u32), 1)
                } else {
                    (1000, 10u128.pow((-exp) as u32))
                }
            }
            _ => return Err(err()),
        };
        let scaled = digits.checked_mul(num).ok_or_else(err)?;
        let divisor = 10u128
            .checked_pow(frac_len)
            .and_then(|d| d.checked_mul(den))
            .ok_or_else(err)?;
        if scaled % divisor != 0 {
            // Finer than a thousandth: Kubernetes rounds up, so do we.
            return Ok(Quantity {
                text: text.to_string(),
                milli: scaled / divisor + 1,
            });
        }
        Ok(Quantity {
            text: text.to_string(),
            milli: scaled / divisor,
        })
    }

    /// The value rounded up to a whole number (bytes, for memory and disk sizes).
    pub fn value(&self) -> u128 {
        self.milli.div_ceil(1000)
    }

    pub fn milli_value(&self) -> u128 {
        self.milli
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// A quantity of whole bytes, written in the largest binary unit that divides it.
    pub fn from_bytes(bytes: u128) -> Self {
        let mut text = bytes.to_string();
        for (suffix, shift) in BINARY_UNITS {
            if bytes != 0 && bytes.is_multiple_of(1u128 << shift) {
                text = format!("{}{suffix}", bytes >> shift);
                break;
            }
        }
        Quantity {
            text,
            milli: bytes * 1000,
        }
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for Quantity {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Quantity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Int(u64),
        }
        let raw = Raw::deserialize(d).map_err(|e: D::Error| {
            // Keep serde's own "missing field" error so the field's path is reported as required.
            if e.to_string().starts_with("missing field") {
                e
            } else {
                serde::de::Error::custom("expected a quantity such as \"2Gi\" or a whole number")
            }
        })?;
        let text = match raw {
            Raw::Text(t) => t,
            Raw::Int(n) => n.to_string(),
        };
        Quantity::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Quantity {
    fn schema_name() -> String {
        "Quantity".into()
    }

    fn json_schema(_: &mut schemars::gen::SchemaGenerator) -> schemars::schema::Schema {
        schemars::schema::SchemaObject {
            instance_type: Some(schemars::schema::InstanceType::String.into()),
            metadata: Some(Box::new(schemars::schema::Metadata {
                description: Some("A Kubernetes quantity such as 512Mi, 2Gi or 500m.".into()),
                ..Default::default()
            })),
            string: Some(Box::new(schemars::schema::StringValidation {
                pattern: Some(PATTERN.into()),
                ..Default::default()
            })),
            ..Default::default()
        }
        .into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_binary_decimal_and_milli_suffixes() {
        assert_eq!(Quantity::parse("512Mi").unwrap().value(), 512 << 20);
        assert_eq!(Quantity::parse("2Gi").unwrap().value(), 2 << 30);
        assert_eq!(Quantity::parse("1G").unwrap().value(), 1_000_000_000);
        assert_eq!(Quantity::parse("1.5Gi").unwrap().value(), 3 << 29);
        assert_eq!(Quantity::parse("500m").unwrap().milli_value(), 500);
        assert_eq!(Quantity::parse("1e3").unwrap().value(), 1000);
        assert_eq!(Quantity::parse("1073741824").unwrap().value(), 1 << 30);
        assert_eq!(Quantity::parse("0.5").unwrap().milli_value(), 500);
    }

    mod pattern {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn every_quantity_the_pattern_allows_is_read(text in PATTERN.trim_matches(['^', '$'])) {
                prop_assert!(Quantity::parse(&text).is_ok(), "{text:?}");
            }

            #[test]
            fn every_quantity_the_server_writes_matches_it(n in any::<u64>(), shift in 0u32..64) {
                let re = regex::Regex::new(PATTERN).unwrap();
                let bytes = u128::from(n >> shift << shift);
                let written = Quantity::from_bytes(bytes).to_string();
                prop_assert!(re.is_match(&written), "{written:?}");
                prop_assert!(re.is_match(&n.to_string()));
            }
        }
    }

    #[test]
    fn rejects_what_kubernetes_rejects() {
        for bad in ["", "2GB", "Gi", "-1Gi", "1.2.3", "1 Gi", "abc", "1e99", "."] {
            assert!(Quantity::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn deserializes_strings_and_numbers_and_keeps_the_text() {
        let q: Quantity = serde_json::from_str("\"4Gi\"").unwrap();
        assert_eq!(serde_json::to_string(&q).unwrap(), "\"4Gi\"");
        let n: Quantity = serde_json::from_str("1024").unwrap();
        assert_eq!(n.value(), 1024);
        assert_eq!(Quantity::from_bytes(3 << 30).as_str(), "3Gi");
    }

    proptest::proptest! {
        #[test]
        fn binary_suffixes_scale_exactly(n in 0u64..1_000_000, i in 0usize..4) {
            let (suffix, shift) = [("Ki", 10), ("Mi", 20), ("Gi", 30), ("Ti", 40)][i];
            let q = Quantity::parse(&format!("{n}{suffix}")).unwrap();
            proptest::prop_assert_eq!(q.value(), (n as u128) << shift);
        }
    }
}
