//! Human units on the command line and in config files: `64MiB`, `5s`, `1e9`.
//!
//! Every parser rejects what it does not understand with an error that names
//! the offending text, never a silent default.

use std::time::Duration;

/// Why a quantity could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    #[error("`{0}` is empty; expected a number")]
    Empty(String),
    #[error("`{text}` is not a number{hint}")]
    NotANumber { text: String, hint: &'static str },
    #[error("`{text}` has an unknown unit `{unit}` (expected one of {expected})")]
    UnknownUnit {
        text: String,
        unit: String,
        expected: &'static str,
    },
    #[error("`{text}` needs a unit (one of {expected})")]
    NoUnit {
        text: String,
        expected: &'static str,
    },
    #[error(
        "`{text}`: `{unit}` could mean {unit}B (powers of 1000) or {unit}iB (powers of 1024); write one of them"
    )]
    Ambiguous { text: String, unit: String },
    #[error("`{0}` is negative")]
    Negative(String),
    #[error("`{0}` is too large")]
    Overflow(String),
    #[error("`{0}` is not a whole number")]
    Fractional(String),
}

const BYTE_UNITS: &str =
    "B, KB, MB, GB, TB, PB (powers of 1000), KiB, MiB, GiB, TiB, PiB (powers of 1024)";
const DURATION_UNITS: &str = "ms, s, m, h, d; a bare number is seconds";

/// Splits `12.5MiB` into (`12.5`, `MiB`).
fn split_unit(text: &str) -> (&str, &str) {
    let end = text
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E' | '_')))
        .unwrap_or(text.len());
    // `e` and `E` belong to the number (`1e9`); no unit starts with them.
    (text[..end].trim(), text[end..].trim())
}

fn parse_number(text: &str, number: &str) -> Result<f64, UnitError> {
    if number.is_empty() {
        return Err(UnitError::NotANumber {
            text: text.to_owned(),
            hint: "",
        });
    }
    let cleaned = number.replace('_', "");
    let value: f64 = cleaned.parse().map_err(|_| UnitError::NotANumber {
        text: text.to_owned(),
        hint: "",
    })?;
    if !value.is_finite() {
        return Err(UnitError::Overflow(text.to_owned()));
    }
    if value < 0.0 {
        return Err(UnitError::Negative(text.to_owned()));
    }
    Ok(value)
}

fn to_u64(text: &str, value: f64) -> Result<u64, UnitError> {
    // 2^64 is exactly representable; anything at or above it overflows.
    if value >= 18_446_744_073_709_551_616.0 {
        return Err(UnitError::Overflow(text.to_owned()));
    }
    if value.fract() != 0.0 {
        return Err(UnitError::Fractional(text.to_owned()));
    }
    // The range check above makes the cast exact.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Ok(value as u64)
}

/// Parses a byte size: `1048576`, `64MiB`, `1.5GB`, `512 KiB`.
///
/// Decimal units (KB, MB, …) are powers of 1000, binary units (KiB, MiB, …)
/// powers of 1024; a bare number is bytes.
pub fn parse_bytes(text: &str) -> Result<u64, UnitError> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(UnitError::Empty(text.to_owned()));
    }
    let (number, unit) = split_unit(trimmed);
    let value = parse_number(text, number)?;
    let scale: f64 = match unit {
        "" | "B" | "b" => 1.0,
        "KB" | "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        "PB" => 1e15,
        // Docker's `64M` is 64 MiB, SI's is 64 MB: ask.
        "K" | "k" | "M" | "G" | "T" | "P" => {
            return Err(UnitError::Ambiguous {
                text: text.to_owned(),
                unit: unit.to_uppercase(),
            });
        }
        "Ki" | "KiB" => 1024.0,
        "Mi" | "MiB" => 1024.0 * 1024.0,
        "Gi" | "GiB" => 1024.0 * 1024.0 * 1024.0,
        "Ti" | "TiB" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        "Pi" | "PiB" => 1024.0 * 1024.0 * 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(UnitError::UnknownUnit {
                text: text.to_owned(),
                unit: other.to_owned(),
                expected: BYTE_UNITS,
            });
        }
    };
    // Scaled units round to the nearest byte; a bare count of bytes must be
    // whole.
    let bytes = if scale == 1.0 {
        value
    } else {
        (value * scale).round()
    };
    to_u64(text, bytes)
}

/// Parses a duration: `250ms`, `5s`, `1.5m`, `2h`, `1d`; a bare number is
/// seconds.
pub fn parse_duration(text: &str) -> Result<Duration, UnitError> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(UnitError::Empty(text.to_owned()));
    }
    let (number, unit) = split_unit(trimmed);
    let value = parse_number(text, number)?;
    let millis_per_unit = match unit {
        "ms" => 1.0,
        "" | "s" | "sec" | "secs" => 1e3,
        "m" | "min" | "mins" => 60e3,
        "h" | "hr" | "hrs" => 3600e3,
        "d" | "day" | "days" => 86_400e3,
        other => {
            return Err(UnitError::UnknownUnit {
                text: text.to_owned(),
                unit: other.to_owned(),
                expected: DURATION_UNITS,
            });
        }
    };
    let millis = to_u64(text, (value * millis_per_unit).round())?;
    Ok(Duration::from_millis(millis))
}

/// Parses a count that may be written in scientific notation: `1000`, `1e9`,
/// `2.5e6`, `1_000_000`.
pub fn parse_count(text: &str) -> Result<u64, UnitError> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(UnitError::Empty(text.to_owned()));
    }
    let (number, unit) = split_unit(trimmed);
    if !unit.is_empty() {
        return Err(UnitError::NotANumber {
            text: text.to_owned(),
            hint: " (a count takes no unit)",
        });
    }
    let value = parse_number(text, number)?;
    to_u64(text, value)
}

/// Parses a percentage written with its sign: `50%`, `12.5%`. Returns
/// tenths of a percent (`12.5%` is 125), so callers compare integers.
pub fn parse_percent(text: &str) -> Result<u32, UnitError> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(UnitError::Empty(text.to_owned()));
    }
    let (number, unit) = split_unit(trimmed);
    if unit.is_empty() {
        return Err(UnitError::NoUnit {
            text: text.to_owned(),
            expected: "%",
        });
    }
    if unit != "%" {
        return Err(UnitError::UnknownUnit {
            text: text.to_owned(),
            unit: unit.to_owned(),
            expected: "%",
        });
    }
    let value = parse_number(text, number)?;
    let tenths = (value * 10.0).round();
    if tenths > f64::from(u32::MAX) {
        return Err(UnitError::Overflow(text.to_owned()));
    }
    // In range, so the cast is exact.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Ok(tenths as u32)
}

/// Parses a transfer rate: `1MiB/s`, `500KB/s`, `2MiB` (per second is
/// implied), or `unlimited`, which is `None`.
pub fn parse_rate(text: &str) -> Result<Option<u64>, UnitError> {
    let trimmed = text.trim();
    if trimmed.eq_ignore_ascii_case("unlimited") {
        return Ok(None);
    }
    let amount = trimmed.strip_suffix("/s").unwrap_or(trimmed);
    // Errors name the whole rate as given, not the amount without `/s`.
    let text = text.to_owned();
    parse_bytes(amount).map(Some).map_err(|e| match e {
        UnitError::UnknownUnit { unit, .. } => UnitError::UnknownUnit {
            text,
            unit,
            expected: "B/s, KB/s, MB/s, GB/s, KiB/s, MiB/s, GiB/s or `unlimited`",
        },
        UnitError::Empty(_) if trimmed.is_empty() => UnitError::Empty(text),
        UnitError::Empty(_) => UnitError::NotANumber { text, hint: "" },
        UnitError::NotANumber { hint, .. } => UnitError::NotANumber { text, hint },
        UnitError::Negative(_) => UnitError::Negative(text),
        UnitError::Overflow(_) => UnitError::Overflow(text),
        UnitError::Fractional(_) => UnitError::Fractional(text),
        UnitError::Ambiguous { unit, .. } => UnitError::Ambiguous { text, unit },
        UnitError::NoUnit { expected, .. } => UnitError::NoUnit { text, expected },
    })
}

/// Formats a byte size with a binary unit, e.g. `64 MiB`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else if value.fract() == 0.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Formats a duration for humans: `850 ms`, `5 s`, `1.5 s`, `2 min`,
/// `2.5 min`, `24 h`.
pub fn format_duration(duration: Duration) -> String {
    let ms = duration.as_millis();
    let scaled = |unit_ms: u128, unit: &str| {
        if ms.is_multiple_of(unit_ms) {
            format!("{} {unit}", ms / unit_ms)
        } else {
            format!(
                "{:.1} {unit}",
                duration.as_secs_f64() * 1000.0 / unit_ms as f64
            )
        }
    };
    if ms < 1000 {
        format!("{ms} ms")
    } else if ms < 120_000 {
        scaled(1000, "s")
    } else if ms < 2 * 3_600_000 {
        scaled(60_000, "min")
    } else {
        scaled(3_600_000, "h")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn percentages_and_rates() {
        assert_eq!(parse_percent("50%"), Ok(500));
        assert_eq!(parse_percent(" 12.5 %"), Ok(125));
        assert_eq!(
            parse_percent("50").unwrap_err().to_string(),
            "`50` needs a unit (one of %)"
        );
        assert!(matches!(parse_percent("-5%"), Err(UnitError::Negative(_))));
        assert_eq!(parse_rate("1MiB/s"), Ok(Some(1 << 20)));
        assert_eq!(parse_rate("500KB"), Ok(Some(500_000)));
        assert_eq!(parse_rate("Unlimited"), Ok(None));
        let err = parse_rate("3 furlongs/s").unwrap_err();
        assert!(err.to_string().contains("furlongs"), "{err}");
        // Errors echo the rate as given.
        for (text, message) in [
            ("-1MiB/s", "`-1MiB/s` is negative"),
            ("/s", "`/s` is not a number"),
            (" ", "` ` is empty; expected a number"),
            ("fast/s", "`fast/s` is not a number"),
            ("0.5/s", "`0.5/s` is not a whole number"),
            ("1e30TiB/s", "`1e30TiB/s` is too large"),
        ] {
            assert_eq!(parse_rate(text).unwrap_err().to_string(), message);
        }
    }

    #[test]
    fn bytes_accept_decimal_and_binary_units() {
        assert_eq!(parse_bytes("64MiB"), Ok(64 << 20));
        assert_eq!(parse_bytes("64 MiB"), Ok(64 << 20));
        assert_eq!(parse_bytes("1.5GB"), Ok(1_500_000_000));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("1KiB"), Ok(1024));
        assert_eq!(parse_bytes("2PiB"), Ok(2 << 50));
        assert_eq!(parse_bytes("1PB"), Ok(1_000_000_000_000_000));
    }

    #[test]
    fn bytes_reject_bad_input_with_the_cause() {
        assert!(
            matches!(parse_bytes("64 parsecs"), Err(UnitError::UnknownUnit { unit, .. }) if unit == "parsecs")
        );
        assert!(matches!(parse_bytes("-1MiB"), Err(UnitError::Negative(_))));
        assert!(matches!(parse_bytes(""), Err(UnitError::Empty(_))));
        assert!(matches!(
            parse_bytes("MiB"),
            Err(UnitError::NotANumber { .. })
        ));
        assert!(matches!(
            parse_bytes("1e30TiB"),
            Err(UnitError::Overflow(_))
        ));
        assert!(matches!(parse_bytes("0.3"), Err(UnitError::Fractional(_))));
        assert_eq!(
            parse_bytes("64M").unwrap_err().to_string(),
            "`64M`: `M` could mean MB (powers of 1000) or MiB (powers of 1024); write one of them"
        );
        assert!(matches!(parse_bytes("2k"), Err(UnitError::Ambiguous { unit, .. }) if unit == "K"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5m"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("0.5d"), Ok(Duration::from_secs(43_200)));
        assert!(matches!(
            parse_duration("5 fortnights"),
            Err(UnitError::UnknownUnit { .. })
        ));
    }

    #[test]
    fn counts_take_scientific_notation() {
        assert_eq!(parse_count("1e9"), Ok(1_000_000_000));
        assert_eq!(parse_count("2.5e6"), Ok(2_500_000));
        assert_eq!(parse_count("1_000"), Ok(1000));
        assert!(parse_count("1.5").is_err());
        assert!(parse_count("10k").is_err());
    }

    #[test]
    fn formatting() {
        assert_eq!(format_bytes(64 << 20), "64 MiB");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(12), "12 B");
        assert_eq!(format_duration(Duration::from_millis(850)), "850 ms");
        assert_eq!(format_duration(Duration::from_secs(5)), "5 s");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1.5 s");
        assert_eq!(format_duration(Duration::from_secs(120)), "2 min");
        assert_eq!(format_duration(Duration::from_secs(150)), "2.5 min");
        assert_eq!(format_duration(Duration::from_secs(24 * 3600)), "24 h");
        assert_eq!(format_duration(Duration::from_secs(9000)), "2.5 h");
        assert_eq!(format_bytes(3 << 50), "3 PiB");
    }

    proptest! {
        #[test]
        fn parsers_never_panic(text in ".{0,40}") {
            let _ = parse_bytes(&text);
            let _ = parse_duration(&text);
            let _ = parse_count(&text);
        }

        #[test]
        fn whole_mebibytes_round_trip(n in 0u64..1_000_000) {
            prop_assert_eq!(parse_bytes(&format!("{n}MiB")), Ok(n << 20));
            // Formatting rounds to one decimal; parsing it back lands within 5%.
            let back = parse_bytes(&format_bytes(n << 20)).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(back.abs_diff(n << 20) <= (n << 20) / 20);
        }
    }
}
