//! The calendar arithmetic of the CMOS clock: Unix seconds to and from a
//! broken-down UTC time, and that time to and from register bytes.

use std::time::{SystemTime, UNIX_EPOCH};

use super::{B_24H, B_DM, HOUR_PM};

/// The host's time, seconds since the Unix epoch (UTC).
pub(super) fn host_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Hinnant's
/// algorithm).
pub(super) fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date `days` after 1970-01-01: (year, month, day).
pub(super) fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

pub(super) fn is_leap(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

pub(super) fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// A broken-down time, in [`TIME_REGS`] order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Fields {
    pub(super) sec: i64,
    pub(super) min: i64,
    pub(super) hour: i64,
    pub(super) weekday: i64,
    pub(super) day: i64,
    pub(super) month: i64,
    pub(super) year: i64,
}

impl Fields {
    /// The UTC time `t` seconds after the epoch.
    pub(super) fn from_unix(t: i64) -> Fields {
        let days = t.div_euclid(86_400);
        let secs = t.rem_euclid(86_400);
        let (year, month, day) = civil_from_days(days);
        Fields {
            sec: secs % 60,
            min: secs / 60 % 60,
            hour: secs / 3600,
            weekday: (days + 4).rem_euclid(7) + 1,
            day,
            month,
            year,
        }
    }

    /// Seconds since the epoch, if this is a valid time (weekday ignored).
    pub(super) fn to_unix(self) -> Option<i64> {
        let valid = (0..60).contains(&self.sec)
            && (0..60).contains(&self.min)
            && (0..24).contains(&self.hour)
            && (1..=12).contains(&self.month)
            && (0..10_000).contains(&self.year)
            && (1..=days_in_month(self.year, self.month)).contains(&self.day);
        valid.then(|| {
            days_from_civil(self.year, self.month, self.day) * 86_400
                + self.hour * 3600
                + self.min * 60
                + self.sec
        })
    }

    /// The register bytes, in [`TIME_REGS`] order, in the mode of `b`.
    pub(super) fn encode(self, b: u8) -> [u8; 8] {
        let enc = |v: i64| {
            let v = v.rem_euclid(100) as u8;
            if b & B_DM != 0 {
                v
            } else {
                ((v / 10) << 4) | (v % 10)
            }
        };
        let hour = if b & B_24H != 0 {
            enc(self.hour)
        } else {
            let h12 = match self.hour % 12 {
                0 => 12,
                h => h,
            };
            enc(h12) | if self.hour >= 12 { HOUR_PM } else { 0 }
        };
        [
            enc(self.sec),
            enc(self.min),
            hour,
            enc(self.weekday),
            enc(self.day),
            enc(self.month),
            enc(self.year),
            enc(self.year.div_euclid(100)),
        ]
    }

    /// Decodes register bytes in the mode of `b` (not validated).
    pub(super) fn decode(regs: [u8; 8], b: u8) -> Fields {
        let dec = |v: u8| {
            if b & B_DM != 0 {
                i64::from(v)
            } else {
                i64::from(v >> 4) * 10 + i64::from(v & 0x0f)
            }
        };
        let hour = if b & B_24H != 0 {
            dec(regs[2])
        } else {
            // 12 AM is hour 0, 12 PM is hour 12; 0 or 13 and up are no
            // hour at all.
            let h = dec(regs[2] & !HOUR_PM);
            match (h, regs[2] & HOUR_PM != 0) {
                (1..=12, false) => h % 12,
                (1..=12, true) => h % 12 + 12,
                _ => -1,
            }
        };
        Fields {
            sec: dec(regs[0]),
            min: dec(regs[1]),
            hour,
            weekday: dec(regs[3]),
            day: dec(regs[4]),
            month: dec(regs[5]),
            year: dec(regs[7]) * 100 + dec(regs[6]),
        }
    }
}
