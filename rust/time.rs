//! Calendar arithmetic for the two timestamps a record carries: the entry id's
//! time and the optional RFC 3339 `uploaded_at`. Times are microseconds since
//! the Unix epoch, UTC.

/// Microseconds between 1970-01-01 and 2000-01-01, PostgreSQL's binary epoch.
pub const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// Latest instant accepted anywhere: 9999-12-31T23:59:59.999999Z.
pub const MAX_US: i64 = 253_402_300_799_999_999;
/// Earliest instant accepted: 0001-01-01T00:00:00Z.
pub const MIN_US: i64 = -62_135_596_800_000_000;

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
pub fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The (year, month, day) of a day count since 1970-01-01.
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if is_leap(year) => 29,
        _ => 28,
    }
}

fn digits(b: &[u8]) -> Option<u32> {
    if b.is_empty() || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(b.iter().fold(0u32, |acc, d| acc * 10 + u32::from(d - b'0')))
}

/// Parses an RFC 3339 timestamp (`2024-05-01T12:00:00Z`, `2024-05-01 12:00:00.5+02:00`)
/// into microseconds since the epoch. A lower-case `t`/`z` and a space separator are
/// accepted, as RFC 3339 allows; fractions beyond microseconds are truncated.
/// A leap second (`:60`) is rejected: PostgreSQL would roll it over silently.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    if !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let year = i64::from(digits(&b[0..4])?);
    let month = digits(&b[5..7])?;
    let day = digits(&b[8..10])?;
    let hour = digits(&b[11..13])?;
    let minute = digits(&b[14..16])?;
    let second = digits(&b[17..19])?;
    if year < 1 || !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    if hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let mut rest = &b[19..];
    let mut micros: i64 = 0;
    if rest.first() == Some(&b'.') {
        let frac_len = rest[1..].iter().take_while(|c| c.is_ascii_digit()).count();
        if frac_len == 0 {
            return None;
        }
        for (i, d) in rest[1..=frac_len].iter().enumerate() {
            if i < 6 {
                micros = micros * 10 + i64::from(d - b'0');
            }
        }
        for _ in frac_len..6 {
            micros *= 10;
        }
        rest = &rest[1 + frac_len..];
    }
    let offset_s: i64 = match rest {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let oh = digits(&[*h1, *h2])?;
            let om = digits(&[*m1, *m2])?;
            if oh > 23 || om > 59 {
                return None;
            }
            let off = i64::from(oh * 3600 + om * 60);
            if *sign == b'-' {
                -off
            } else {
                off
            }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + i64::from(hour * 3600 + minute * 60 + second) - offset_s;
    let us = secs * 1_000_000 + micros;
    (MIN_US..=MAX_US).contains(&us).then_some(us)
}

/// Appends `us` as PostgreSQL prints a UTC timestamptz with `DateStyle=ISO`:
/// `2024-05-01 12:00:00.123+00` (fraction trimmed of trailing zeros, omitted when zero).
pub fn write_pg_timestamp(out: &mut Vec<u8>, us: i64) {
    let secs = us.div_euclid(1_000_000);
    let frac = us.rem_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let y = year as u32;
    push2(out, y / 100);
    push2(out, y % 100);
    out.push(b'-');
    push2(out, month);
    out.push(b'-');
    push2(out, day);
    out.push(b' ');
    push2(out, (sod / 3600) as u32);
    out.push(b':');
    push2(out, (sod / 60 % 60) as u32);
    out.push(b':');
    push2(out, (sod % 60) as u32);
    if frac != 0 {
        let mut f = [0u8; 6];
        let mut v = frac;
        for slot in f.iter_mut().rev() {
            *slot = b'0' + (v % 10) as u8;
            v /= 10;
        }
        let len = 6 - f.iter().rev().take_while(|&&c| c == b'0').count();
        out.push(b'.');
        out.extend_from_slice(&f[..len]);
    }
    out.extend_from_slice(b"+00");
}

fn push2(out: &mut Vec<u8>, v: u32) {
    out.push(b'0' + (v / 10) as u8);
    out.push(b'0' + (v % 10) as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fmt(us: i64) -> String {
        let mut v = Vec::new();
        write_pg_timestamp(&mut v, us);
        String::from_utf8(v).unwrap()
    }

    #[test]
    fn civil_round_trip() {
        for days in -800_000..800_000 {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn parses_rfc3339() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339("2000-01-01T00:00:00Z"),
            Some(PG_EPOCH_OFFSET_US)
        );
        assert_eq!(parse_rfc3339("1970-01-01T01:00:00+01:00"), Some(0));
        assert_eq!(parse_rfc3339("1970-01-01 00:00:00.5z"), Some(500_000));
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00.1234567Z"), Some(123_456));
        assert!(parse_rfc3339("2024-02-29T00:00:00Z").is_some());
        for bad in [
            "2023-02-29T00:00:00Z",
            "2024-13-01T00:00:00Z",
            "2024-01-01T24:00:00Z",
            "2024-01-01T00:00:60Z",
            "2024-01-01T00:00:00",
            "2024-01-01T00:00:00.Z",
            "2024-01-01T00:00:00+0100",
            "0000-01-01T00:00:00Z",
            "yesterday",
            "",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn formats_like_postgres() {
        assert_eq!(fmt(0), "1970-01-01 00:00:00+00");
        assert_eq!(fmt(1_700_000_000_123_000), "2023-11-14 22:13:20.123+00");
        assert_eq!(fmt(1), "1970-01-01 00:00:00.000001+00");
        assert_eq!(fmt(-1), "1969-12-31 23:59:59.999999+00");
        assert_eq!(fmt(MAX_US), "9999-12-31 23:59:59.999999+00");
    }
}
