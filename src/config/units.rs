//! Human units in config files: durations (`250ms`, `5s`, `24h`), sizes (`64KiB`, `1MiB`) and
//! rates (`200/s`).
//!
//! Parsers return `Err(reason)` with a sentence meant for the operator; the caller adds the file
//! and line. The serializers print the shortest exact form, so a config printed by `weir check`
//! or `weir convert` reads like one a person wrote and parses back to the same values.

use std::time::Duration;

use serde::{Deserializer, Serializer};

use super::values::Scalar;

const NANOS_PER: [(&str, u128); 7] = [
    ("d", 86_400_000_000_000),
    ("h", 3_600_000_000_000),
    ("m", 60_000_000_000),
    ("s", 1_000_000_000),
    ("ms", 1_000_000),
    ("us", 1_000),
    ("ns", 1),
];

/// Splits `"250ms"` into `(250, "ms")`; the number must be a plain non-negative integer.
fn split_number(s: &str) -> Option<(u64, &str)> {
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    if end == 0 {
        return None;
    }
    let n = s[..end].parse().ok()?;
    Some((n, s[end..].trim_start()))
}

/// Parses a duration: an integer followed by `d`, `h`, `m`, `s`, `ms`, `us` or `ns`
/// (`250ms`, `5s`, `2m`, `1h`, `30d`), or a bare `0`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let bad = || {
        format!(
            "invalid duration `{s}`: expected an integer followed by a unit, \
             one of d, h, m, s, ms, us, ns (e.g. 250ms, 5s, 2m), or 0"
        )
    };
    let (n, unit) = split_number(t).ok_or_else(bad)?;
    if unit.is_empty() {
        return if n == 0 {
            Ok(Duration::ZERO)
        } else {
            Err(format!(
                "invalid duration `{s}`: a unit is required (e.g. {n}s or {n}ms)"
            ))
        };
    }
    let per = NANOS_PER
        .iter()
        .find(|(u, _)| *u == unit)
        .map(|(_, per)| *per)
        .ok_or_else(bad)?;
    let nanos = u128::from(n) * per;
    let secs =
        u64::try_from(nanos / 1_000_000_000).map_err(|_| format!("duration `{s}` is too large"))?;
    // The remainder is below 10^9, so it fits in u32.
    let sub = (nanos % 1_000_000_000) as u32;
    Ok(Duration::new(secs, sub))
}

/// The shortest exact form of a duration: `5s`, `250ms`, `2m`, `30d`. A single day prints as
/// `24h`, the form people write; zero prints as `0s`.
pub fn format_duration(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".to_string();
    }
    for (unit, per) in NANOS_PER {
        if nanos.is_multiple_of(per) && !(unit == "d" && nanos / per == 1) {
            return format!("{}{unit}", nanos / per);
        }
    }
    format!("{nanos}ns")
}

/// Parses a size in bytes: a plain integer, or an integer followed by `B`, `KiB`, `MiB`, `GiB`
/// (powers of 1024) or `KB`, `MB`, `GB` (powers of 1000). Units are case-insensitive.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let (n, unit) = split_number(t).ok_or_else(|| {
        format!(
            "invalid size `{s}`: expected a number of bytes, optionally followed by \
             KiB, MiB, GiB, KB, MB or GB (e.g. 64KiB, 1MiB)"
        )
    })?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        _ => {
            return Err(format!(
                "invalid size `{s}`: unknown unit `{unit}` (use B, KiB, MiB, GiB, KB, MB or GB)"
            ))
        }
    };
    n.checked_mul(mult)
        .and_then(|b| usize::try_from(b).ok())
        .ok_or_else(|| format!("size `{s}` is too large"))
}

/// The shortest exact form of a size: `1MiB`, `64KiB`, `1500`.
pub fn format_size(bytes: usize) -> String {
    let b = bytes as u64;
    for (unit, per) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if b != 0 && b.is_multiple_of(per) {
            return format!("{}{unit}", b / per);
        }
    }
    b.to_string()
}

/// Parses a rate into events per second: `200/s`, `50/m`, `3000/h`, or a bare integer (per
/// second). Rates slower than one per second round up to 1/s; fractions round up. Zero is an
/// error: a rate of nothing would stall whatever it paces.
pub fn parse_rate(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let bad =
        || format!("invalid rate `{s}`: expected COUNT/s, COUNT/m or COUNT/h (e.g. 200/s, 50/m)");
    let (count, per) = match t.split_once('/') {
        Some((count, unit)) => {
            let per: u64 = match unit.trim() {
                "s" => 1,
                "m" => 60,
                "h" => 3600,
                _ => return Err(bad()),
            };
            (count.trim(), per)
        }
        None => (t, 1),
    };
    if count.is_empty() || !count.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let count: u64 = count.parse().map_err(|_| bad())?;
    if count == 0 {
        return Err(format!("invalid rate `{s}`: must be at least 1"));
    }
    u32::try_from(count.div_ceil(per)).map_err(|_| format!("rate `{s}` is too large"))
}

// === serde `with` modules, one per value type ===

/// Any duration, `0` included.
pub mod duration {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Scalar::new("a duration such as 250ms or 5s", parse_duration).read(d)
    }

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(*d))
    }
}

/// A duration longer than zero.
pub mod positive_duration {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Scalar::new("a duration such as 5s", parse).read(d)
    }

    pub use super::duration::serialize;

    pub fn parse(s: &str) -> Result<Duration, String> {
        match parse_duration(s)? {
            d if d.is_zero() => Err(format!("`{s}` must be longer than 0")),
            d => Ok(d),
        }
    }
}

/// A duration longer than zero that, when the key is absent (`None`), follows another setting
/// (said where it is used).
pub mod inherited_duration {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        positive_duration::deserialize(d).map(Some)
    }

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&format_duration(*d)),
            None => s.serialize_str("inherited"),
        }
    }
}

/// A limit that can be turned off: `0`, `none`, `off` (or `~`) mean none; printed as `off`.
pub mod duration_or_off {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Scalar::new("a duration such as 5s, or off", |s| match s.trim() {
            "none" | "off" => Ok(None),
            t => parse_duration(t).map(|d| Some(d).filter(|d| !d.is_zero())),
        })
        .null_as("off")
        .read(d)
    }

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&format_duration(*d)),
            None => s.serialize_str("off"),
        }
    }
}

/// A duration in whole seconds (`0s` allowed), for settings that are counted in seconds where
/// they are used: a sub-second part would be silently dropped, so it is an error.
pub mod whole_seconds {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Scalar::new("a duration in whole seconds such as 5s", parse).read(d)
    }

    pub use super::duration::serialize;

    pub fn parse(s: &str) -> Result<Duration, String> {
        let d = parse_duration(s)?;
        if d.subsec_nanos() != 0 {
            return Err(format!(
                "`{}`: whole seconds only (Pingora counts it in seconds)",
                s.trim()
            ));
        }
        Ok(d)
    }
}

/// Whole seconds, or `0`/`0s`/`off` (also `~`) for none; printed as `off`.
pub mod seconds_or_off {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Scalar::new(
            "a duration in whole seconds such as 60s, or off",
            |s| match s.trim() {
                "off" => Ok(None),
                t => whole_seconds::parse(t).map(|d| Some(d).filter(|d| !d.is_zero())),
            },
        )
        .null_as("off")
        .read(d)
    }

    pub use super::duration_or_off::serialize;
}

/// A size in bytes, printed in its shortest exact form.
pub mod size {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
        Scalar::new("a size such as 64KiB or 1MiB", parse_size).read(d)
    }

    pub fn serialize<S: Serializer>(n: &usize, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_size(*n))
    }
}

/// Events per second, printed as `N/s`.
pub mod rate {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        Scalar::new("a rate such as 200/s", parse_rate).read(d)
    }

    pub fn serialize<S: Serializer>(n: &u32, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{n}/s"))
    }
}

/// Events per second like [`rate`], `0` allowed (none); printed as `N/s`.
pub mod rate_or_zero {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        Scalar::new("a rate such as 10/s, or 0", parse).read(d)
    }

    pub use super::rate::serialize;

    pub fn parse(s: &str) -> Result<u32, String> {
        match s.trim() {
            "0" | "0/s" | "0/m" | "0/h" => Ok(0),
            t => parse_rate(t),
        }
    }
}

/// A quantile: `p95`, `p99.9` or a fraction such as `0.95` (strictly between 0 and 1);
/// printed as `pN`.
pub mod quantile {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Scalar::new("a quantile such as p95 or 0.95", parse).read(d)
    }

    pub fn serialize<S: Serializer>(q: &f64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("p{}", q * 100.0))
    }

    pub fn parse(s: &str) -> Result<f64, String> {
        let t = s.trim();
        let q = match t.strip_prefix(['p', 'P']) {
            Some(pct) => pct.parse::<f64>().map(|p| p / 100.0),
            None => t.parse::<f64>(),
        }
        .map_err(|_| format!("`{s}` is not a quantile such as p95 or 0.95"))?;
        if q.is_finite() && q > 0.0 && q < 1.0 {
            Ok(q)
        } else {
            Err(format!("`{s}` must lie strictly between p0 and p100"))
        }
    }
}

/// A share such as `20%` (0 to 1000%), or `off` (no limit); printed as `N%` or `off`.
pub mod percent_or_off {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
        Scalar::new("a percentage such as 20%, or off", parse)
            .null_as("off")
            .read(d)
    }

    pub fn serialize<S: Serializer>(p: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
        match p {
            Some(p) => s.serialize_str(&format!("{}%", p * 100.0)),
            None => s.serialize_str("off"),
        }
    }

    pub fn parse(s: &str) -> Result<Option<f64>, String> {
        let t = s.trim();
        if t == "off" || t == "none" {
            return Ok(None);
        }
        let bad =
            || format!("invalid percentage `{t}`: expected a number and `%` (e.g. 20%), or off");
        let n: f64 = t
            .strip_suffix('%')
            .ok_or_else(bad)?
            .trim()
            .parse()
            .map_err(|_| bad())?;
        if !(0.0..=1000.0).contains(&n) {
            return Err(format!("percentage `{t}` must be between 0% and 1000%"));
        }
        Ok(Some(n / 100.0))
    }
}

/// Bytes per second, such as `1KiB/s`, or `0`/`off` for no minimum; printed as `N/s` or `off`.
pub mod byte_rate_or_off {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
        Scalar::new("a rate in bytes such as 1KiB/s, or off", parse)
            .null_as("off")
            .read(d)
    }

    pub fn serialize<S: Serializer>(n: &usize, s: S) -> Result<S::Ok, S::Error> {
        match n {
            0 => s.serialize_str("off"),
            n => s.serialize_str(&format!("{}/s", format_size(*n))),
        }
    }

    pub fn parse(s: &str) -> Result<usize, String> {
        let t = s.trim();
        if t == "off" || t == "0" {
            return Ok(0);
        }
        match t.strip_suffix("/s") {
            Some(size) => parse_size(size),
            None => Err(format!(
                "`{t}` is not a rate in bytes such as 1KiB/s, or off"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_rates_parse_with_a_unit_or_off() {
        assert_eq!(byte_rate_or_off::parse("1KiB/s"), Ok(1024));
        assert_eq!(byte_rate_or_off::parse(" 512/s "), Ok(512));
        assert_eq!(byte_rate_or_off::parse("off"), Ok(0));
        assert_eq!(byte_rate_or_off::parse("0"), Ok(0));
        assert!(byte_rate_or_off::parse("1KiB").is_err());
        assert!(byte_rate_or_off::parse("fast/s").is_err());
    }

    #[test]
    fn durations_parse_in_every_unit() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_duration("15us"), Ok(Duration::from_micros(15)));
        assert_eq!(parse_duration("7ns"), Ok(Duration::from_nanos(7)));
        assert_eq!(parse_duration(" 5s "), Ok(Duration::from_secs(5)));
    }

    #[test]
    fn bare_zero_is_a_duration_but_other_bare_numbers_need_a_unit() {
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        let err = parse_duration("5").unwrap_err();
        assert!(err.contains("unit is required"), "{err}");
    }

    #[test]
    fn malformed_durations_are_rejected_with_the_input() {
        for bad in ["", "s", "5x", "-5s", "1.5s", "5 sec", "ms5"] {
            let err = parse_duration(bad).unwrap_err();
            assert!(err.contains(&format!("`{bad}`")), "{bad}: {err}");
        }
        assert!(parse_duration("99999999999999999999d").is_err());
        assert!(parse_duration("999999999999999d")
            .unwrap_err()
            .contains("too large"));
    }

    #[test]
    fn durations_print_in_their_shortest_exact_form() {
        assert_eq!(format_duration(Duration::from_secs(5)), "5s");
        assert_eq!(format_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format_duration(Duration::from_secs(120)), "2m");
        assert_eq!(format_duration(Duration::from_secs(86_400)), "24h");
        assert_eq!(format_duration(Duration::from_secs(30 * 86_400)), "30d");
        assert_eq!(format_duration(Duration::ZERO), "0s");
        assert_eq!(format_duration(Duration::new(1, 1)), "1000000001ns");
    }

    #[test]
    fn printed_durations_parse_back_to_the_same_value() {
        for d in [
            Duration::ZERO,
            Duration::from_millis(250),
            Duration::from_secs(86_400),
            Duration::from_secs(90),
            Duration::new(3, 17),
        ] {
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
    }

    #[test]
    fn sizes_parse_binary_and_decimal_units() {
        assert_eq!(parse_size("64KiB"), Ok(64 * 1024));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("512KB"), Ok(512_000));
        assert_eq!(parse_size("2mb"), Ok(2_000_000));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("10B"), Ok(10));
        assert_eq!(parse_size("0"), Ok(0));
    }

    #[test]
    fn malformed_sizes_are_rejected() {
        assert!(parse_size("").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("1.5MiB").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("3 parsecs")
            .unwrap_err()
            .contains("unknown unit"));
        assert!(parse_size("99999999999999999GiB")
            .unwrap_err()
            .contains("too large"));
    }

    #[test]
    fn sizes_print_in_their_shortest_exact_form() {
        assert_eq!(format_size(1 << 20), "1MiB");
        assert_eq!(format_size(64 * 1024), "64KiB");
        assert_eq!(format_size(1500), "1500");
        assert_eq!(format_size(0), "0");
        for n in [0, 1, 1024, 1 << 20, 1500, 3 << 30] {
            assert_eq!(parse_size(&format_size(n)), Ok(n));
        }
    }

    #[test]
    fn rates_convert_to_per_second_and_never_below_one() {
        assert_eq!(parse_rate("200/s"), Ok(200));
        assert_eq!(parse_rate("120/m"), Ok(2));
        assert_eq!(parse_rate("50/m"), Ok(1));
        assert_eq!(parse_rate("90/m"), Ok(2));
        assert_eq!(parse_rate("1/h"), Ok(1));
        assert_eq!(parse_rate("7200/h"), Ok(2));
        assert_eq!(parse_rate("25"), Ok(25));
    }

    #[test]
    fn malformed_or_zero_rates_are_rejected() {
        for bad in ["", "/s", "0/s", "10/d", "ten/s", "-1/s", "1.5/s"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
        assert!(parse_rate("0/s").unwrap_err().contains("at least 1"));
    }
}
