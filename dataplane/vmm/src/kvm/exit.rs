//! Decoding one exit of `KVM_RUN`: MMIO is served in place (through the
//! [`IoHandler`]); port I/O, the exits that end a run and errors are handed
//! back to the run loop as a [`Step`].

use devplane_wire::AccessSize;
use kvm_ioctls::VcpuExit as KvmExit;

use super::{IoHandler, VcpuExit};

/// What the first half of the run loop decided about an exit.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Step {
    /// Handled; enter the guest again.
    Resume,
    /// Port I/O; the data area is completed once `kvm_run.io` is read.
    Io {
        port: u16,
        data: *mut u8,
        len: usize,
        out: bool,
    },
    /// Return to the caller.
    Exit(VcpuExit),
    /// Internal error; the suberror is read from `kvm_run`.
    InternalError,
    /// Anything else.
    Unexpected(String),
}

/// Decides what to do with an exit; handles MMIO in place (an access
/// whose length is not 1, 2, 4 or 8 is counted in `odd_mmio`: a read
/// returns all-ones, a write is dropped).
pub(super) fn decode(exit: KvmExit<'_>, io: &mut dyn IoHandler, odd_mmio: &mut u64) -> Step {
    match exit {
        KvmExit::IoOut(port, data) => Step::Io {
            port,
            len: data.len(),
            data: data.as_ptr().cast_mut(),
            out: true,
        },
        KvmExit::IoIn(port, data) => Step::Io {
            port,
            len: data.len(),
            data: data.as_mut_ptr(),
            out: false,
        },
        KvmExit::MmioRead(gpa, data) => {
            match AccessSize::from_len(data.len()) {
                Some(size) => {
                    let value = io.mmio_read(gpa, size) & size.mask();
                    data.copy_from_slice(&value.to_le_bytes()[..data.len()]);
                }
                None => {
                    *odd_mmio += 1;
                    data.fill(0xff);
                }
            }
            Step::Resume
        }
        KvmExit::MmioWrite(gpa, data) => {
            match AccessSize::from_len(data.len()) {
                Some(size) => io.mmio_write(gpa, size, le_value(data)),
                None => *odd_mmio += 1,
            }
            Step::Resume
        }
        KvmExit::Intr | KvmExit::IrqWindowOpen => Step::Resume,
        KvmExit::Hlt => Step::Exit(VcpuExit::Halt),
        KvmExit::Shutdown => Step::Exit(VcpuExit::Shutdown),
        KvmExit::InternalError => Step::InternalError,
        KvmExit::FailEntry(reason, cpu) => Step::Unexpected(format!(
            "entry failed (hardware reason {reason:#x}, cpu {cpu})"
        )),
        other => Step::Unexpected(format!("{other:?}")),
    }
}

/// The little-endian value of up to 8 bytes.
pub(super) fn le_value(bytes: &[u8]) -> u64 {
    let mut buf = [0u8; 8];
    let n = bytes.len().min(8);
    buf[..n].copy_from_slice(&bytes[..n]);
    u64::from_le_bytes(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records MMIO accesses; reads return `0x1122_3344_5566_7788`.
    #[derive(Default)]
    struct Rec {
        reads: Vec<(u64, AccessSize)>,
        writes: Vec<(u64, AccessSize, u64)>,
    }

    impl IoHandler for Rec {
        fn pio_read(&mut self, _: u16, _: AccessSize) -> u64 {
            unreachable!("port I/O is completed by the run loop")
        }
        fn pio_write(&mut self, _: u16, _: AccessSize, _: u64) {
            unreachable!("port I/O is completed by the run loop")
        }
        fn mmio_read(&mut self, gpa: u64, size: AccessSize) -> u64 {
            self.reads.push((gpa, size));
            0x1122_3344_5566_7788
        }
        fn mmio_write(&mut self, gpa: u64, size: AccessSize, data: u64) {
            self.writes.push((gpa, size, data));
        }
    }

    #[test]
    fn le_value_zero_extends() {
        assert_eq!(le_value(&[0x34, 0x12]), 0x1234);
        assert_eq!(le_value(&[0xff; 9]), u64::MAX);
        assert_eq!(le_value(&[]), 0);
    }

    #[test]
    fn mmio_is_served_in_place_and_masked_to_its_size() {
        let (mut io, mut odd) = (Rec::default(), 0);
        let mut data = [0u8; 2];
        let step = decode(KvmExit::MmioRead(0xd000, &mut data), &mut io, &mut odd);
        assert_eq!(step, Step::Resume);
        assert_eq!(data, [0x88, 0x77]);
        assert_eq!(io.reads, vec![(0xd000, AccessSize::B2)]);
        let step = decode(KvmExit::MmioWrite(0xd008, &[1, 2, 3, 4]), &mut io, &mut odd);
        assert_eq!(step, Step::Resume);
        assert_eq!(io.writes, vec![(0xd008, AccessSize::B4, 0x0403_0201)]);
        assert_eq!(odd, 0);
    }

    #[test]
    fn odd_sized_mmio_is_counted_not_served() {
        let (mut io, mut odd) = (Rec::default(), 0);
        let mut data = [0u8; 3];
        decode(KvmExit::MmioRead(0xd000, &mut data), &mut io, &mut odd);
        assert_eq!(data, [0xff; 3], "reads all-ones");
        decode(KvmExit::MmioWrite(0xd000, &[1; 6]), &mut io, &mut odd);
        assert_eq!(odd, 2);
        assert!(io.reads.is_empty() && io.writes.is_empty());
    }

    #[test]
    fn port_io_goes_back_to_the_run_loop() {
        let (mut io, mut odd) = (Rec::default(), 0);
        let mut data = [0u8; 4];
        let ptr = data.as_mut_ptr();
        let step = decode(KvmExit::IoIn(0x3f8, &mut data), &mut io, &mut odd);
        assert_eq!(
            step,
            Step::Io {
                port: 0x3f8,
                data: ptr,
                len: 4,
                out: false
            }
        );
        let out = [7u8];
        let step = decode(KvmExit::IoOut(0x80, &out), &mut io, &mut odd);
        assert!(matches!(
            step,
            Step::Io {
                port: 0x80,
                len: 1,
                out: true,
                ..
            }
        ));
    }

    #[test]
    fn ends_errors_and_the_rest_are_told_apart() {
        let (mut io, mut odd) = (Rec::default(), 0);
        let mut d = |e| decode(e, &mut io, &mut odd);
        assert_eq!(d(KvmExit::Hlt), Step::Exit(VcpuExit::Halt));
        assert_eq!(d(KvmExit::Shutdown), Step::Exit(VcpuExit::Shutdown));
        assert_eq!(d(KvmExit::Intr), Step::Resume);
        assert_eq!(d(KvmExit::IrqWindowOpen), Step::Resume);
        assert_eq!(d(KvmExit::InternalError), Step::InternalError);
        assert!(matches!(
            d(KvmExit::FailEntry(0x21, 1)),
            Step::Unexpected(s) if s.contains("0x21")
        ));
        assert!(matches!(
            d(KvmExit::Debug(Default::default())),
            Step::Unexpected(_)
        ));
    }
}
