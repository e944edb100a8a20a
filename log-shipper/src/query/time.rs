//! Times of the query command, without a clock: durations (`15m`, `1h`, `2d`), instants
//! (RFC 3339 or Unix seconds) as Unix nanoseconds, and RFC 3339 text with nanoseconds in UTC,
//! the form both stores accept and the command prints. `now` is always passed in.

use thiserror::Error;

use crate::cri::parse_timestamp;

const NANOS_PER_SECOND: i64 = 1_000_000_000;

/// A time the command cannot read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TimeError {
    /// Not `<number><unit>` with the units `ms`, `s`, `m`, `h`, `d`, `w`.
    #[error("`{0}` is not a duration like 30s, 15m, 1h, 2d or 1h30m")]
    Duration(String),
    /// Neither RFC 3339 nor Unix seconds.
    #[error("`{0}` is neither an RFC 3339 time (2026-12-06T10:00:00Z) nor Unix seconds")]
    Instant(String),
}

/// Parses a duration: one or more `<integer><unit>` (`ms`, `s`, `m`, `h`, `d`, `w`), such as
/// `90s`, `15m`, `1h30m`, `2d`; into nanoseconds, at least one.
pub fn parse_duration(text: &str) -> Result<i64, TimeError> {
    let bad = || TimeError::Duration(text.into());
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total: i64 = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad());
        }
        let n: i64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let letters = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = match &rest[..letters] {
            "ms" => 1_000_000,
            "s" => NANOS_PER_SECOND,
            "m" => 60 * NANOS_PER_SECOND,
            "h" => 3600 * NANOS_PER_SECOND,
            "d" => 86_400 * NANOS_PER_SECOND,
            "w" => 7 * 86_400 * NANOS_PER_SECOND,
            _ => return Err(bad()),
        };
        rest = &rest[letters..];
        total = n
            .checked_mul(unit)
            .and_then(|d| total.checked_add(d))
            .ok_or_else(bad)?;
    }
    if total <= 0 {
        return Err(bad());
    }
    Ok(total)
}

/// Parses an instant: RFC 3339 (`2026-12-06T10:00:00Z`, fractions and `±hh:mm` offsets too)
/// or Unix seconds (`1765015200`, `1765015200.5`); into Unix nanoseconds.
pub fn parse_instant(text: &str) -> Result<i64, TimeError> {
    let text = text.trim();
    if let Ok(ns) = parse_timestamp(text.as_bytes()) {
        return Ok(ns);
    }
    let bad = || TimeError::Instant(text.into());
    let (whole, fraction) = match text.split_once('.') {
        Some((_, "")) => return Err(bad()),
        Some(parts) => parts,
        None => (text, ""),
    };
    if whole.is_empty()
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || fraction.len() > 9
        || !fraction.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    let seconds: i64 = whole.parse().map_err(|_| bad())?;
    let mut nanos: i64 = 0;
    if !fraction.is_empty() {
        nanos = fraction.parse::<i64>().map_err(|_| bad())? * 10i64.pow(9 - fraction.len() as u32);
    }
    seconds
        .checked_mul(NANOS_PER_SECOND)
        .and_then(|s| s.checked_add(nanos))
        .ok_or_else(bad)
}

/// Unix nanoseconds as RFC 3339 in UTC with nine fractional digits
/// (`2026-12-06T10:00:00.123456789Z`).
pub fn format_rfc3339(ns: i64) -> String {
    let seconds = ns.div_euclid(NANOS_PER_SECOND);
    let nanos = ns.rem_euclid(NANOS_PER_SECOND);
    let days = seconds.div_euclid(86_400);
    let second_of_day = seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        second_of_day / 3600,
        second_of_day / 60 % 60,
        second_of_day % 60
    )
}

/// The proleptic Gregorian date of a day number (days since 1970-01-01), after Howard
/// Hinnant's `civil_from_days`.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn durations() {
        let s = NANOS_PER_SECOND;
        assert_eq!(parse_duration("15m").unwrap(), 900 * s);
        assert_eq!(parse_duration("1h").unwrap(), 3600 * s);
        assert_eq!(parse_duration("2d").unwrap(), 2 * 86_400 * s);
        assert_eq!(parse_duration("1h30m").unwrap(), 5400 * s);
        assert_eq!(parse_duration("250ms").unwrap(), s / 4);
        assert_eq!(parse_duration("1w").unwrap(), 7 * 86_400 * s);
        for bad in [
            "",
            "h",
            "10",
            "1x",
            "-1h",
            "1.5h",
            "0s",
            "1h 2m",
            "99999999999999w",
        ] {
            assert_eq!(
                parse_duration(bad),
                Err(TimeError::Duration(bad.into())),
                "{bad}"
            );
        }
    }

    #[test]
    fn instants() {
        assert_eq!(
            parse_instant("2026-12-06T10:00:00Z").unwrap(),
            1_796_551_200 * NANOS_PER_SECOND
        );
        assert_eq!(
            parse_instant("2026-12-06T11:00:00.5+01:00").unwrap(),
            1_796_551_200 * NANOS_PER_SECOND + 500_000_000
        );
        assert_eq!(
            parse_instant("1796551200").unwrap(),
            1_796_551_200 * NANOS_PER_SECOND
        );
        assert_eq!(
            parse_instant("1796551200.000000001").unwrap(),
            1_796_551_200 * NANOS_PER_SECOND + 1
        );
        for bad in [
            "",
            "yesterday",
            "2026-12-06",
            "12.",
            ".5",
            "1.0000000001",
            "-5",
        ] {
            assert!(parse_instant(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rfc3339() {
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(format_rfc3339(-1), "1969-12-31T23:59:59.999999999Z");
        assert_eq!(
            format_rfc3339(1_796_551_200 * NANOS_PER_SECOND + 123_456_789),
            "2026-12-06T10:00:00.123456789Z"
        );
        assert_eq!(
            format_rfc3339(951_782_400 * NANOS_PER_SECOND),
            "2000-02-29T00:00:00.000000000Z"
        );
    }

    proptest! {
        #[test]
        fn format_then_parse(ns in -9_000_000_000_000_000_000i64..9_000_000_000_000_000_000i64) {
            prop_assert_eq!(parse_instant(&format_rfc3339(ns)).unwrap(), ns);
        }
    }
}
