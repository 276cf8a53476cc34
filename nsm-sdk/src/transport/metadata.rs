//! gRPC metadata that NSM puts on calls: the caller's token (`nsm-client-token`), its
//! expiry (`nsm-client-token-expires`, RFC 3339 with nanoseconds, as Go's
//! `time.RFC3339Nano` writes it) and the deadline (`grpc-timeout`).
//!
//! The timestamp codec is small and exact: UTC output with trailing zeros of the
//! fraction trimmed; input with any offset (`Z`, `+02:00`), up to nanosecond precision.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tonic::metadata::{MetadataMap, MetadataValue};

use crate::wire::bounds::{cut, MAX_TOKEN_LEN};
use crate::{Error, Result};

/// Metadata key of the caller's token for this call.
pub const CLIENT_TOKEN: &str = "nsm-client-token";

/// Metadata key of the expiry of the caller's token (RFC 3339).
pub const CLIENT_TOKEN_EXPIRES: &str = "nsm-client-token-expires";

/// Metadata key of the call's deadline, relative to its arrival.
pub const GRPC_TIMEOUT: &str = "grpc-timeout";

/// Reads the caller's token and its expiry from `md`. Absent keys are `None`; a value
/// that is not ASCII or not an RFC 3339 time is an [`Error::InvalidArgument`].
pub fn read_token(md: &MetadataMap) -> Result<(Option<String>, Option<SystemTime>)> {
    let text = |key: &str| -> Result<Option<String>> {
        md.get(key)
            .map(|v| {
                v.to_str()
                    .map(str::to_string)
                    .map_err(|_| Error::invalid(format!("metadata {key} is not printable ASCII")))
            })
            .transpose()
    };
    let token = text(CLIENT_TOKEN)?;
    if let Some(t) = token.as_deref().filter(|t| t.len() > MAX_TOKEN_LEN) {
        return Err(Error::invalid(format!(
            "metadata {CLIENT_TOKEN}: {} bytes, at most {MAX_TOKEN_LEN}",
            t.len()
        )));
    }
    let expires = text(CLIENT_TOKEN_EXPIRES)?
        .map(|s| {
            parse_rfc3339(&s)
                .map_err(|e| Error::invalid(format!("metadata {CLIENT_TOKEN_EXPIRES}: {e}")))
        })
        .transpose()?;
    Ok((token, expires))
}

/// Writes the token and its expiry into `md` (each only when set).
pub fn write_token(
    md: &mut MetadataMap,
    token: Option<&str>,
    expires: Option<SystemTime>,
) -> Result<()> {
    if let Some(token) = token {
        let value = MetadataValue::try_from(token).map_err(|_| {
            Error::invalid(format!(
                "token for metadata {CLIENT_TOKEN} is not printable ASCII"
            ))
        })?;
        md.insert(CLIENT_TOKEN, value);
    }
    if let Some(expires) = expires {
        let value = MetadataValue::try_from(format_rfc3339(expires))
            .map_err(|_| Error::internal("formatted time is not ASCII"))?;
        md.insert(CLIENT_TOKEN_EXPIRES, value);
    }
    Ok(())
}

/// The deadline a caller gave in `grpc-timeout`, if the header is present and valid.
pub fn read_timeout(md: &MetadataMap) -> Option<Duration> {
    md.get(GRPC_TIMEOUT)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
}

/// Parses a `grpc-timeout` value: 1 to 8 digits and a unit (`H`, `M`, `S`, `m`, `u`,
/// `n`).
pub fn parse_grpc_timeout(s: &str) -> Option<Duration> {
    let unit = s.chars().last()?;
    let digits = &s[..s.len() - unit.len_utf8()];
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        'H' => Duration::from_secs(n * 3600),
        'M' => Duration::from_secs(n * 60),
        'S' => Duration::from_secs(n),
        'm' => Duration::from_millis(n),
        'u' => Duration::from_micros(n),
        'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Formats `t` as RFC 3339 in UTC with up to nine fraction digits, trailing zeros
/// trimmed (Go's `time.RFC3339Nano`), e.g. `2024-05-01T12:00:00.5Z`.
pub fn format_rfc3339(t: SystemTime) -> String {
    let (secs, nanos) = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
        Err(e) => {
            let d = e.duration();
            let (s, n) = (-(d.as_secs() as i64), d.subsec_nanos());
            if n == 0 {
                (s, 0)
            } else {
                (s - 1, 1_000_000_000 - n)
            }
        }
    };
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let mut out = format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    );
    if nanos > 0 {
        let frac = format!("{nanos:09}");
        out.push('.');
        out.push_str(frac.trim_end_matches('0'));
    }
    out.push('Z');
    out
}

/// Parses an RFC 3339 time (`2006-01-02T15:04:05.999999999Z07:00`; `Z` or a numeric
/// offset; fraction optional, digits past nanoseconds ignored).
pub fn parse_rfc3339(s: &str) -> Result<SystemTime> {
    let bad =
        |why: &str| Error::invalid(format!("{:?} is not an RFC 3339 time: {why}", cut(s, 64)));
    let b = s.as_bytes();
    if b.len() < 20 {
        return Err(bad("too short"));
    }
    let num = |range: std::ops::Range<usize>| -> Result<i64> {
        let part = &b[range];
        if !part.iter().all(u8::is_ascii_digit) {
            return Err(bad("expected digits"));
        }
        Ok(part
            .iter()
            .fold(0i64, |acc, c| acc * 10 + i64::from(c - b'0')))
    };
    let sep = |i: usize, allowed: &[u8]| -> Result<()> {
        if allowed.contains(&b[i]) {
            Ok(())
        } else {
            Err(bad("unexpected separator"))
        }
    };
    let year = num(0..4)?;
    sep(4, b"-")?;
    let month = num(5..7)?;
    sep(7, b"-")?;
    let day = num(8..10)?;
    sep(10, b"Tt ")?;
    let hour = num(11..13)?;
    sep(13, b":")?;
    let minute = num(14..16)?;
    sep(16, b":")?;
    let second = num(17..19)?;
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return Err(bad("no such date"));
    }
    if hour > 23 || minute > 59 || second > 59 {
        return Err(bad("no such time of day"));
    }

    let mut i = 19;
    let mut nanos: u32 = 0;
    if b[i] == b'.' {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            if i - start < 9 {
                nanos = nanos * 10 + u32::from(b[i] - b'0');
            }
            i += 1;
        }
        let digits = i - start;
        if digits == 0 {
            return Err(bad("empty fraction"));
        }
        for _ in digits..9 {
            nanos *= 10;
        }
    }
    let offset = match &b[i..] {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let digits = [*h1, *h2, *m1, *m2];
            if !digits.iter().all(u8::is_ascii_digit) {
                return Err(bad("bad offset"));
            }
            let oh = i64::from((h1 - b'0') * 10 + (h2 - b'0'));
            let om = i64::from((m1 - b'0') * 10 + (m2 - b'0'));
            if oh > 23 || om > 59 {
                return Err(bad("bad offset"));
            }
            let off = oh * 3600 + om * 60;
            if *sign == b'-' {
                -off
            } else {
                off
            }
        }
        _ => return Err(bad("expected Z or an offset like +01:00 at the end")),
    };

    let secs =
        days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second - offset;
    let base = if secs >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_secs(secs as u64))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs()))
    };
    base.and_then(|t| t.checked_add(Duration::from_nanos(u64::from(nanos))))
        .ok_or_else(|| bad("out of range"))
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_go_rfc3339_nano() {
        let t = UNIX_EPOCH + Duration::new(1_714_564_800, 500_000_000);
        assert_eq!(format_rfc3339(t), "2024-05-01T12:00:00.5Z");
        assert_eq!(format_rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::new(951_782_400, 123_456_789);
        assert_eq!(format_rfc3339(t), "2000-02-29T00:00:00.123456789Z");
        let before = UNIX_EPOCH - Duration::new(1, 250_000_000);
        assert_eq!(format_rfc3339(before), "1969-12-31T23:59:58.75Z");
    }

    #[test]
    fn parses_offsets_fractions_and_round_trips() {
        let t = parse_rfc3339("2024-05-01T14:00:00.5+02:00").unwrap();
        assert_eq!(t, UNIX_EPOCH + Duration::new(1_714_564_800, 500_000_000));
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z").unwrap(), UNIX_EPOCH);
        assert_eq!(
            parse_rfc3339("1969-12-31T19:00:00-05:00").unwrap(),
            UNIX_EPOCH
        );
        // Digits past nanoseconds are ignored, as Go does.
        assert_eq!(
            parse_rfc3339("1970-01-01T00:00:00.0000000019Z").unwrap(),
            UNIX_EPOCH + Duration::from_nanos(1)
        );
        for nanos in [0u32, 1, 10, 999_999_999, 120_000_000] {
            for secs in [0i64, 86_399, 1_714_564_800, 253_402_300_799, -86_401] {
                let t = if secs >= 0 {
                    UNIX_EPOCH + Duration::from_secs(secs as u64)
                } else {
                    UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
                } + Duration::from_nanos(u64::from(nanos));
                assert_eq!(
                    parse_rfc3339(&format_rfc3339(t)).unwrap(),
                    t,
                    "{secs} {nanos}"
                );
            }
        }
    }

    #[test]
    fn rejects_what_is_not_rfc3339() {
        for s in [
            "",
            "2024-05-01",
            "2024-05-01T12:00:00",
            "2024-13-01T12:00:00Z",
            "2023-02-29T12:00:00Z",
            "2024-05-01T24:00:00Z",
            "2024-05-01T12:00:00.Z",
            "2024-05-01T12:00:00+0200",
            "2024-05-01T12:00:00Zjunk",
            "２０２４-05-01T12:00:00Z",
        ] {
            let e = parse_rfc3339(s).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{s}");
        }
    }

    #[test]
    fn parses_grpc_timeouts() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(
            parse_grpc_timeout("1500m"),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(
            parse_grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "S", "123456789S", "5s", "-5S", "5", "5é"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
    }

    #[test]
    fn token_metadata_round_trips_and_bad_values_are_invalid_arguments() {
        let mut md = MetadataMap::new();
        let t = UNIX_EPOCH + Duration::new(1_714_564_800, 7);
        write_token(&mut md, Some("tok"), Some(t)).unwrap();
        assert_eq!(read_token(&md).unwrap(), (Some("tok".to_string()), Some(t)));
        assert_eq!(read_token(&MetadataMap::new()).unwrap(), (None, None));
        assert!(write_token(&mut md, Some("bad\nvalue"), None).is_err());

        let mut md = MetadataMap::new();
        md.insert(CLIENT_TOKEN_EXPIRES, MetadataValue::from_static("tomorrow"));
        assert_eq!(
            read_token(&md).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }
}
