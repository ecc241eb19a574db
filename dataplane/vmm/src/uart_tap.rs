//! The console of a VM whose UART is remote.
//!
//! Every byte the guest transmits is an `OUT` to the UART's transmit
//! holding register, and every such write passes through the client on its
//! way to the server. The tap shadows the two registers that decide whether
//! a write to offset 0 is a transmitted byte — LCR's divisor-latch bit and
//! MCR's loopback bit, which only the guest changes — and copies the
//! transmitted bytes to the VM's [`Console`]. The server's model still
//! decides everything the guest sees (LSR, IIR, interrupts).

use super::boot::Console;

const THR: u16 = 0;
const LCR: u16 = 3;
const MCR: u16 = 4;
const LCR_DLAB: u8 = 0x80;
const MCR_LOOP: u8 = 0x10;

/// Copies a remote 16550's transmitted bytes to a console.
#[derive(Clone)]
pub struct UartTap {
    base: u16,
    lcr: u8,
    mcr: u8,
    console: Console,
}

impl UartTap {
    /// A tap on the UART at port `base` writing to `console`.
    pub fn new(base: u16, console: Console) -> UartTap {
        UartTap {
            base,
            lcr: 0,
            mcr: 0,
            console,
        }
    }

    /// Sees a port write of the guest (any port; others are ignored).
    pub fn observe(&mut self, port: u16, data: u64) {
        let Some(off) = port.checked_sub(self.base).filter(|o| *o < 8) else {
            return;
        };
        let byte = data as u8;
        match off {
            THR if self.lcr & LCR_DLAB == 0 && self.mcr & MCR_LOOP == 0 => {
                self.console.write(&[byte]);
            }
            LCR => self.lcr = byte,
            MCR => self.mcr = byte,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_transmitted_bytes_only() {
        let c = Console::new();
        let mut t = UartTap::new(0x3f8, c.clone());
        // The 8250 driver sets the divisor: DLAB on, divisor bytes to
        // offsets 0 and 1, DLAB off.
        t.observe(0x3fb, 0x83);
        t.observe(0x3f8, 0x01);
        t.observe(0x3f9, 0x00);
        t.observe(0x3fb, 0x03);
        for b in b"ok\n" {
            t.observe(0x3f8, u64::from(*b));
        }
        // Loopback test bytes are not output.
        t.observe(0x3fc, 0x10);
        t.observe(0x3f8, u64::from(b'X'));
        t.observe(0x3fc, 0x03);
        t.observe(0x3f8, u64::from(b'!'));
        // Other ports are not the UART's.
        t.observe(0x2f8, u64::from(b'Y'));
        t.observe(0x80, 0);
        assert_eq!(c.text(), "ok\n!");
    }
}
