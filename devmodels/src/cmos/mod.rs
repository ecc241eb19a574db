//! The PC's MC146818 CMOS real-time clock and its 128 bytes of NVRAM.
//!
//! Two byte-wide ports (either address space): base+0 selects a register
//! (bit 7 is the chipset's NMI-disable bit, ignored here; reads return
//! 0xff, the port being write-only), base+1 reads or writes it.
//!
//! | index | register |
//! | --- | --- |
//! | 0x00, 0x02, 0x04 | seconds, minutes, hours (12-hour mode: bit 7 = PM) |
//! | 0x01, 0x03, 0x05 | alarm seconds, minutes, hours (stored only) |
//! | 0x06..=0x09 | weekday (1 = Sunday), day of month, month, year of century |
//! | 0x0A | register A: divider/rate; UIP (bit 7) always reads 0 |
//! | 0x0B | register B: SET (7), UIE (4), DM binary (2), 24-hour (1) |
//! | 0x0C | register C: flags, cleared by the read |
//! | 0x0D | register D: VRT (0x80), always set |
//! | 0x32 | century |
//! | anything else | NVRAM, kept in the snapshot |
//!
//! Time is the host's UTC clock at the moment of each read plus an offset
//! the guest sets by writing time registers: either between setting and
//! clearing register B's SET bit (the usual sequence, Linux's included:
//! the offset is computed when SET is cleared), or one register at a time
//! with SET clear (the offset changes at once). While SET is held the time
//! registers read back what was written, as on the chip. A written time
//! that is no valid date (a month of 13, say) leaves the offset unchanged.
//! The weekday follows from the date; a weekday the guest writes is not
//! kept. The offset is relative to the host clock, so a model moved to
//! another server keeps the guest's time as well as the two servers'
//! clocks agree.
//!
//! Register C reports UF (update ended, 0x10) once the clock has ticked
//! since the last read of C, and IRQF (0x80) with it when UIE is set. The
//! model raises no interrupts: alarm, periodic and update interrupts are
//! not emulated (AF and PF never set).

use devplane_wire::AccessSize;

mod calendar;

use crate::codec::{Decoder, Encoder};
use crate::{DeviceError, DeviceModel, Snapshot, SnapshotError, Space};
use calendar::{Fields, host_now};

/// The kind name.
pub const KIND: &str = "cmos";
/// Index port offset.
pub const PORT_INDEX: u64 = 0;
/// Data port offset.
pub const PORT_DATA: u64 = 1;
/// Bytes of register and NVRAM space.
pub const NVRAM_LEN: usize = 128;
/// Seconds.
pub const REG_SECONDS: u8 = 0x00;
/// Alarm seconds.
pub const REG_SECONDS_ALARM: u8 = 0x01;
/// Minutes.
pub const REG_MINUTES: u8 = 0x02;
/// Alarm minutes.
pub const REG_MINUTES_ALARM: u8 = 0x03;
/// Hours.
pub const REG_HOURS: u8 = 0x04;
/// Alarm hours.
pub const REG_HOURS_ALARM: u8 = 0x05;
/// Day of the week, 1 = Sunday.
pub const REG_WEEKDAY: u8 = 0x06;
/// Day of the month.
pub const REG_DAY: u8 = 0x07;
/// Month.
pub const REG_MONTH: u8 = 0x08;
/// Year of the century.
pub const REG_YEAR: u8 = 0x09;
/// Register A.
pub const REG_A: u8 = 0x0a;
/// Register B.
pub const REG_B: u8 = 0x0b;
/// Register C.
pub const REG_C: u8 = 0x0c;
/// Register D.
pub const REG_D: u8 = 0x0d;
/// Century (the ACPI FADT's default century register).
pub const REG_CENTURY: u8 = 0x32;
/// Register A at reset: 32.768 kHz time base, 1024 Hz rate.
pub const DEFAULT_A: u8 = 0x26;
/// Register B at reset: 24-hour, BCD.
pub const DEFAULT_B: u8 = B_24H;
/// Register A: update in progress.
pub const A_UIP: u8 = 0x80;
/// Register B: SET (updates inhibited while the guest writes the time).
pub const B_SET: u8 = 0x80;
/// Register B: update-ended interrupt enable.
pub const B_UIE: u8 = 0x10;
/// Register B: data mode binary (clear: BCD).
pub const B_DM: u8 = 0x04;
/// Register B: 24-hour mode (clear: 12-hour).
pub const B_24H: u8 = 0x02;
/// Register C: interrupt request flag.
pub const C_IRQF: u8 = 0x80;
/// Register C: update-ended flag.
pub const C_UF: u8 = 0x10;
/// Register D: valid RAM and time.
pub const D_VRT: u8 = 0x80;

/// The time registers, in [`Fields`] order.
const TIME_REGS: [u8; 8] = [
    REG_SECONDS,
    REG_MINUTES,
    REG_HOURS,
    REG_WEEKDAY,
    REG_DAY,
    REG_MONTH,
    REG_YEAR,
    REG_CENTURY,
];
/// Hours' PM bit in 12-hour mode.
const HOUR_PM: u8 = 0x80;
/// Offsets beyond this (about 10,000 years) are corrupt snapshots.
const MAX_OFFSET: i64 = 10_000 * 366 * 86_400;
/// A snapshot's layout version.
const SNAPSHOT_VERSION: u32 = 1;

/// The MC146818 RTC and NVRAM.
#[derive(Debug)]
pub struct Cmos {
    ram: [u8; NVRAM_LEN],
    index: u8,
    /// Guest time minus host time, seconds.
    offset: i64,
    /// A time register was written while SET was held.
    staged: bool,
    /// Host time when register C was last read (or the model built).
    c_seen: i64,
    clock: fn() -> i64,
}

impl Cmos {
    /// A CMOS at reset, showing the host's time.
    pub fn new() -> Cmos {
        Cmos::with_clock(host_now)
    }

    /// A CMOS whose host clock is `clock` (Unix seconds, UTC).
    fn with_clock(clock: fn() -> i64) -> Cmos {
        let mut ram = [0; NVRAM_LEN];
        ram[usize::from(REG_A)] = DEFAULT_A;
        ram[usize::from(REG_B)] = DEFAULT_B;
        ram[usize::from(REG_D)] = D_VRT;
        Cmos {
            ram,
            index: 0,
            offset: 0,
            staged: false,
            c_seen: clock(),
            clock,
        }
    }

    /// The guest's time now, seconds since the epoch.
    pub fn guest_time(&self) -> i64 {
        (self.clock)().saturating_add(self.offset)
    }

    fn b(&self) -> u8 {
        self.ram[usize::from(REG_B)]
    }

    /// Copies the current time into the time registers.
    fn stage_now(&mut self, b: u8) {
        let regs = Fields::from_unix(self.guest_time()).encode(b);
        for (r, v) in TIME_REGS.iter().zip(regs) {
            self.ram[usize::from(*r)] = v;
        }
    }

    /// Sets the offset from the time registers, decoded in mode `b`.
    fn commit(&mut self, b: u8) {
        let mut regs = [0; 8];
        for (v, r) in regs.iter_mut().zip(TIME_REGS) {
            *v = self.ram[usize::from(r)];
        }
        if let Some(t) = Fields::decode(regs, b).to_unix() {
            self.offset = t - (self.clock)();
        }
    }

    fn read_reg(&mut self, index: u8) -> u8 {
        let b = self.b();
        if let Some(i) = TIME_REGS.iter().position(|r| *r == index) {
            if b & B_SET != 0 {
                return self.ram[usize::from(index)];
            }
            return Fields::from_unix(self.guest_time()).encode(b)[i];
        }
        match index {
            REG_A => self.ram[usize::from(REG_A)] & !A_UIP,
            REG_C => {
                let now = (self.clock)();
                let mut c = 0;
                if now != self.c_seen && b & B_SET == 0 {
                    c |= C_UF;
                    if b & B_UIE != 0 {
                        c |= C_IRQF;
                    }
                }
                self.c_seen = now;
                c
            }
            REG_D => D_VRT,
            _ => self.ram[usize::from(index)],
        }
    }

    fn write_reg(&mut self, index: u8, value: u8) {
        let b = self.b();
        if TIME_REGS.contains(&index) {
            if b & B_SET != 0 {
                self.ram[usize::from(index)] = value;
                self.staged = true;
            } else {
                self.stage_now(b);
                self.ram[usize::from(index)] = value;
                self.commit(b);
            }
            return;
        }
        match index {
            REG_A => self.ram[usize::from(REG_A)] = value & !A_UIP,
            REG_B => {
                let mut value = value;
                if value & B_SET != 0 {
                    // SET clears UIE (datasheet); the registers freeze
                    // at the time it was set.
                    value &= !B_UIE;
                    if b & B_SET == 0 {
                        self.stage_now(value);
                        self.staged = false;
                    }
                } else if b & B_SET != 0 && self.staged {
                    self.commit(b);
                    self.staged = false;
                }
                self.ram[usize::from(REG_B)] = value;
            }
            REG_C | REG_D => {}
            _ => self.ram[usize::from(index)] = value,
        }
    }

    fn check(space: Space, offset: u64, size: AccessSize) -> Result<(), DeviceError> {
        if offset > PORT_DATA {
            return Err(DeviceError::Unmapped { space, offset });
        }
        if size != AccessSize::B1 {
            return Err(DeviceError::BadAccess {
                space,
                offset,
                size: size.bytes(),
            });
        }
        Ok(())
    }
}

impl Default for Cmos {
    fn default() -> Self {
        Cmos::new()
    }
}

impl DeviceModel for Cmos {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn read(&mut self, space: Space, offset: u64, size: AccessSize) -> Result<u64, DeviceError> {
        Cmos::check(space, offset, size)?;
        Ok(match offset {
            PORT_INDEX => 0xff,
            _ => u64::from(self.read_reg(self.index)),
        })
    }

    fn write(
        &mut self,
        space: Space,
        offset: u64,
        size: AccessSize,
        data: u64,
    ) -> Result<(), DeviceError> {
        Cmos::check(space, offset, size)?;
        let value = (data & 0xff) as u8;
        match offset {
            PORT_INDEX => self.index = value & 0x7f,
            _ => self.write_reg(self.index, value),
        }
        Ok(())
    }

    /// Version 1: the 128 register/NVRAM bytes, the index, the time
    /// offset, whether a time is staged under SET, and when register C
    /// was last read.
    fn snapshot(&self) -> Snapshot {
        let data = Encoder::new()
            .bytes(&self.ram)
            .u8(self.index)
            .u64(self.offset as u64)
            .u8(u8::from(self.staged))
            .u64(self.c_seen as u64)
            .finish();
        Snapshot {
            kind: KIND.into(),
            version: SNAPSHOT_VERSION,
            data,
        }
    }

    fn restore(&mut self, snap: &Snapshot) -> Result<(), SnapshotError> {
        let mut d = Decoder::new(KIND, snap.expect(KIND, SNAPSHOT_VERSION)?);
        let ram: [u8; NVRAM_LEN] = d
            .bytes(NVRAM_LEN)?
            .try_into()
            .map_err(|_| d.corrupt("NVRAM is not 128 bytes"))?;
        let index = d.u8()?;
        let offset = d.u64()? as i64;
        let staged = d.u8()?;
        let c_seen = d.u64()? as i64;
        d.finish()?;
        let bad = |why| SnapshotError::Corrupt { kind: KIND, why };
        if usize::from(index) >= NVRAM_LEN {
            return Err(bad("index out of range"));
        }
        if !(-MAX_OFFSET..=MAX_OFFSET).contains(&offset) {
            return Err(bad("time offset out of range"));
        }
        let staged = match staged {
            0 => false,
            1 => true,
            _ => return Err(bad("staged flag is not a boolean")),
        };
        self.ram = ram;
        self.index = index;
        self.offset = offset;
        self.staged = staged;
        self.c_seen = c_seen;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::calendar::{civil_from_days, days_from_civil};
    use super::*;

    thread_local! {
        static FAKE_NOW: Cell<i64> = const { Cell::new(1_700_000_000) };
    }

    fn fake_now() -> i64 {
        FAKE_NOW.with(Cell::get)
    }

    fn advance(secs: i64) {
        FAKE_NOW.with(|c| c.set(c.get() + secs));
    }

    fn rd(c: &mut Cmos, reg: u8) -> u8 {
        c.write(Space::Pio, PORT_INDEX, AccessSize::B1, reg.into())
            .unwrap();
        c.read(Space::Pio, PORT_DATA, AccessSize::B1).unwrap() as u8
    }

    fn wr(c: &mut Cmos, reg: u8, v: u8) {
        c.write(Space::Pio, PORT_INDEX, AccessSize::B1, reg.into())
            .unwrap();
        c.write(Space::Pio, PORT_DATA, AccessSize::B1, v.into())
            .unwrap();
    }

    fn bcd(v: u8) -> u8 {
        (v >> 4) * 10 + (v & 0x0f)
    }

    /// Reads the time the way Linux's mc146818_get_time does (again if the
    /// seconds moved meanwhile), decoding by hand from the datasheet (not
    /// with the model's own code).
    fn guest_clock(c: &mut Cmos) -> i64 {
        loop {
            let sec = rd(c, REG_SECONDS);
            let t = guest_clock_once(c);
            if rd(c, REG_SECONDS) == sec {
                return t;
            }
        }
    }

    fn guest_clock_once(c: &mut Cmos) -> i64 {
        assert_eq!(rd(c, REG_A) & A_UIP, 0, "UIP must read clear");
        let b = rd(c, REG_B);
        let dec = |v: u8| if b & B_DM != 0 { v } else { bcd(v) };
        let raw_hour = rd(c, REG_HOURS);
        let hour = if b & B_24H != 0 {
            dec(raw_hour)
        } else {
            dec(raw_hour & 0x7f) % 12 + if raw_hour & 0x80 != 0 { 12 } else { 0 }
        };
        let year = i64::from(dec(rd(c, REG_CENTURY))) * 100 + i64::from(dec(rd(c, REG_YEAR)));
        let days = days_from_civil(
            year,
            dec(rd(c, REG_MONTH)).into(),
            dec(rd(c, REG_DAY)).into(),
        );
        let weekday = dec(rd(c, REG_WEEKDAY));
        assert_eq!(i64::from(weekday), (days + 4).rem_euclid(7) + 1);
        days * 86_400
            + i64::from(hour) * 3600
            + i64::from(dec(rd(c, REG_MINUTES))) * 60
            + i64::from(dec(rd(c, REG_SECONDS)))
    }

    #[test]
    fn calendar_conversions_agree() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        for days in (-800_000..800_000).step_by(997) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        // 2024-02-29 12:34:56 UTC, a Thursday.
        let f = Fields::from_unix(1_709_210_096);
        assert_eq!(
            f,
            Fields {
                sec: 56,
                min: 34,
                hour: 12,
                weekday: 5,
                day: 29,
                month: 2,
                year: 2024
            }
        );
        assert_eq!(f.to_unix(), Some(1_709_210_096));
    }

    #[test]
    fn reads_the_host_clock_in_bcd_and_binary() {
        let mut c = Cmos::new();
        assert_eq!(rd(&mut c, REG_B), DEFAULT_B, "24-hour BCD at reset");
        assert_eq!(rd(&mut c, REG_A), DEFAULT_A);
        assert_eq!(rd(&mut c, REG_D), D_VRT);
        let close = |t: i64| (t - host_now()).abs() <= 2;
        let t = guest_clock(&mut c);
        assert!(close(t), "BCD time {t} vs host {}", host_now());
        wr(&mut c, REG_B, B_24H | B_DM);
        let t = guest_clock(&mut c);
        assert!(close(t), "binary time {t} vs host {}", host_now());
        wr(&mut c, REG_B, B_DM);
        let t = guest_clock(&mut c);
        assert!(close(t), "12-hour binary time {t}");
        wr(&mut c, REG_B, 0);
        let t = guest_clock(&mut c);
        assert!(close(t), "12-hour BCD time {t}");
    }

    #[test]
    fn twelve_hour_mode_encodes_noon_and_midnight() {
        let mut c = Cmos::with_clock(fake_now);
        // 00:30 and 12:30 UTC.
        FAKE_NOW.with(|n| n.set(1_709_166_600));
        wr(&mut c, REG_B, 0);
        assert_eq!(rd(&mut c, REG_HOURS), 0x12, "12 AM");
        advance(12 * 3600);
        assert_eq!(rd(&mut c, REG_HOURS), 0x92, "12 PM");
        advance(3600);
        assert_eq!(rd(&mut c, REG_HOURS), 0x81, "1 PM");
        wr(&mut c, REG_B, B_DM);
        assert_eq!(rd(&mut c, REG_HOURS), 0x81);
        wr(&mut c, REG_B, B_DM | B_24H);
        assert_eq!(rd(&mut c, REG_HOURS), 13);
    }

    #[test]
    fn nvram_round_trips_and_the_nmi_bit_is_ignored() {
        let mut c = Cmos::new();
        let nvram = (0x0e..0x80u8).filter(|r| *r != REG_CENTURY);
        for r in nvram.clone() {
            wr(&mut c, r, r ^ 0xa5);
        }
        for r in [REG_SECONDS_ALARM, REG_MINUTES_ALARM, REG_HOURS_ALARM] {
            wr(&mut c, r, 0xc0 | r);
        }
        for r in nvram.clone() {
            assert_eq!(rd(&mut c, r), r ^ 0xa5, "register {r:#x}");
            // With the NMI-disable bit set in the index.
            assert_eq!(rd(&mut c, r | 0x80), r ^ 0xa5);
        }
        for r in [REG_SECONDS_ALARM, REG_MINUTES_ALARM, REG_HOURS_ALARM] {
            assert_eq!(rd(&mut c, r), 0xc0 | r);
        }
        assert_eq!(
            c.read(Space::Pio, PORT_INDEX, AccessSize::B1).unwrap(),
            0xff
        );
        // The registers the guest may not change.
        wr(&mut c, REG_D, 0);
        assert_eq!(rd(&mut c, REG_D), D_VRT);
        wr(&mut c, REG_A, 0xff);
        assert_eq!(rd(&mut c, REG_A), 0x7f, "UIP is read-only");
    }

    #[test]
    fn a_guest_set_time_moves_later_reads_by_the_same_offset() {
        let mut c = Cmos::with_clock(fake_now);
        // Linux's sequence: SET, write in the current mode, clear SET.
        wr(&mut c, REG_B, B_24H | B_SET);
        for (r, v) in [
            (REG_SECONDS, 0x06),
            (REG_MINUTES, 0x05),
            (REG_HOURS, 0x04),
            (REG_DAY, 0x03),
            (REG_MONTH, 0x02),
            (REG_YEAR, 0x01),
            (REG_CENTURY, 0x20),
        ] {
            wr(&mut c, r, v);
        }
        advance(30);
        assert_eq!(rd(&mut c, REG_SECONDS), 0x06, "frozen while SET is held");
        wr(&mut c, REG_B, B_24H);
        // 2001-02-03 04:05:06 UTC.
        let set = 981_173_106;
        assert_eq!(guest_clock(&mut c), set);
        advance(3600 + 7);
        assert_eq!(guest_clock(&mut c), set + 3607, "the clock keeps running");
        assert_eq!(c.guest_time() - fake_now(), set - (fake_now() - 3607));

        // One register with SET clear moves the clock at once.
        wr(&mut c, REG_B, B_24H | B_DM);
        let before = guest_clock(&mut c);
        wr(&mut c, REG_YEAR, 2);
        assert_eq!(guest_clock(&mut c) - before, 365 * 86_400);

        // SET held without writes leaves the offset alone.
        let before = guest_clock(&mut c) - fake_now();
        wr(&mut c, REG_B, B_24H | B_DM | B_SET);
        advance(100);
        wr(&mut c, REG_B, B_24H | B_DM);
        assert_eq!(guest_clock(&mut c) - fake_now(), before);

        // An impossible date is ignored; garbage never panics.
        wr(&mut c, REG_B, B_24H | B_DM | B_SET);
        wr(&mut c, REG_MONTH, 13);
        wr(&mut c, REG_B, B_24H | B_DM);
        assert_eq!(guest_clock(&mut c) - fake_now(), before);
        wr(&mut c, REG_B, B_SET);
        for r in TIME_REGS {
            wr(&mut c, r, 0xff);
        }
        wr(&mut c, REG_B, 0);
        wr(&mut c, REG_B, B_24H);
        wr(&mut c, REG_HOURS, 0x99);
        assert_eq!(guest_clock(&mut c) - fake_now(), before);
    }

    #[test]
    fn register_c_reports_an_update_and_clears_on_read() {
        let mut c = Cmos::with_clock(fake_now);
        assert_eq!(rd(&mut c, REG_C), 0, "no update yet");
        advance(1);
        assert_eq!(rd(&mut c, REG_C), C_UF);
        assert_eq!(rd(&mut c, REG_C), 0, "cleared by the read");
        wr(&mut c, REG_B, B_24H | B_UIE);
        advance(1);
        assert_eq!(rd(&mut c, REG_C), C_IRQF | C_UF);
        assert_eq!(rd(&mut c, REG_C), 0);
        wr(&mut c, REG_C, 0xff);
        assert_eq!(rd(&mut c, REG_C), 0, "read-only");
        wr(&mut c, REG_B, B_24H | B_UIE | B_SET);
        assert_eq!(rd(&mut c, REG_B), B_24H | B_SET, "SET clears UIE");
    }

    #[test]
    fn bad_accesses_are_refused() {
        let mut c = Cmos::new();
        assert_eq!(
            c.read(Space::Pio, 2, AccessSize::B1),
            Err(DeviceError::Unmapped {
                space: Space::Pio,
                offset: 2
            })
        );
        assert!(matches!(
            c.write(Space::Pio, PORT_DATA, AccessSize::B2, 0),
            Err(DeviceError::BadAccess { size: 2, .. })
        ));
    }

    #[test]
    fn snapshot_round_trips_time_and_nvram() {
        let mut c = Cmos::with_clock(fake_now);
        wr(&mut c, 0x40, 0x12);
        wr(&mut c, REG_B, B_24H | B_DM);
        wr(&mut c, REG_YEAR, 50);
        wr(&mut c, REG_B, B_24H | B_DM | B_SET);
        wr(&mut c, REG_MINUTES, 7);
        c.write(Space::Pio, PORT_INDEX, AccessSize::B1, REG_MINUTES.into())
            .unwrap();
        let snap = c.snapshot();
        let mut d = Cmos::with_clock(fake_now);
        d.restore(&snap).unwrap();
        assert_eq!(d.snapshot(), snap);
        assert_eq!(d.read(Space::Pio, PORT_DATA, AccessSize::B1).unwrap(), 7);
        assert_eq!(rd(&mut d, 0x40), 0x12);
        wr(&mut c, REG_B, B_24H | B_DM);
        wr(&mut d, REG_B, B_24H | B_DM);
        assert_eq!(d.guest_time(), c.guest_time(), "same staged time committed");
    }

    #[test]
    fn bad_snapshots_change_nothing() {
        let mut c = Cmos::with_clock(fake_now);
        wr(&mut c, 0x40, 0x34);
        let good = c.snapshot();
        let mut d = Cmos::with_clock(fake_now);
        wr(&mut d, 0x41, 0x56);
        let before = d.snapshot();
        let mut short = good.clone();
        short.data.pop();
        assert!(d.restore(&short).is_err());
        let mut bad_index = good.clone();
        bad_index.data[8 + NVRAM_LEN] = 0x80;
        assert!(d.restore(&bad_index).is_err());
        let mut bad_offset = good.clone();
        bad_offset.data[8 + NVRAM_LEN + 1..8 + NVRAM_LEN + 9]
            .copy_from_slice(&i64::MAX.to_le_bytes());
        assert!(d.restore(&bad_offset).is_err());
        assert!(matches!(
            d.restore(&Snapshot {
                version: 9,
                ..good.clone()
            }),
            Err(SnapshotError::UnsupportedVersion { .. })
        ));
        assert!(matches!(
            d.restore(&Snapshot {
                kind: "uart".into(),
                ..good
            }),
            Err(SnapshotError::WrongKind { .. })
        ));
        assert_eq!(d.snapshot(), before, "a failed restore changed the state");
    }
}
