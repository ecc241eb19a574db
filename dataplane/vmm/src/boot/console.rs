//! A guest's serial console: the bytes its UART transmitted, shared with
//! whoever watches the VM, optionally echoed to the VMM's stdout.
//!
//! A [`Console`] is only a sink. A local UART model feeds it through
//! [`ConsoleUart`]; a remote UART's output could feed the same sink from
//! the engine later, so callers do not care where the UART runs.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use devplane_devmodels::uart::Uart;
use devplane_devmodels::{
    DeviceError, DeviceModel, IrqEvent, ModelEvent, Snapshot, SnapshotError, Space,
};
use devplane_wire::AccessSize;

/// Most bytes a console keeps; older output is dropped first.
pub const CONSOLE_LIMIT: usize = 4 << 20;

#[derive(Debug, Default)]
struct Inner {
    bytes: Mutex<Vec<u8>>,
    grew: Condvar,
    echo: AtomicBool,
}

/// A guest's console output. Cheap to clone; clones share the bytes.
#[derive(Debug, Clone, Default)]
pub struct Console {
    inner: Arc<Inner>,
}

impl Console {
    /// An empty console that does not echo.
    pub fn new() -> Console {
        Console::default()
    }

    /// Also copy everything written from now on to this process's stdout.
    pub fn set_echo(&self, echo: bool) {
        self.inner.echo.store(echo, Ordering::Relaxed);
    }

    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        self.inner.bytes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends what the guest transmitted.
    pub fn write(&self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if self.inner.echo.load(Ordering::Relaxed) {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(bytes);
            let _ = out.flush();
        }
        let mut b = self.lock();
        b.extend_from_slice(bytes);
        if b.len() > CONSOLE_LIMIT {
            let excess = b.len() - CONSOLE_LIMIT;
            b.drain(..excess);
        }
        drop(b);
        self.inner.grew.notify_all();
    }

    /// Everything kept so far.
    pub fn bytes(&self) -> Vec<u8> {
        self.lock().clone()
    }

    /// Everything kept so far, as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.lock()).into_owned()
    }

    /// Whether the output contains `needle`.
    pub fn contains(&self, needle: &str) -> bool {
        find(&self.lock(), needle.as_bytes())
    }

    /// Waits until the output contains `needle` or `timeout` passes;
    /// returns whether it appeared.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut b = self.lock();
        loop {
            if find(&b, needle.as_bytes()) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            b = match self.inner.grew.wait_timeout(b, deadline - now) {
                Ok((b, _)) => b,
                Err(p) => p.into_inner().0,
            };
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || hay.windows(needle.len()).any(|w| w == needle)
}

/// A local UART model whose transmitted bytes go to a [`Console`] after
/// every access.
#[derive(Debug)]
pub struct ConsoleUart {
    uart: Uart,
    console: Console,
}

impl ConsoleUart {
    /// Wraps `uart`; its output goes to `console`.
    pub fn new(uart: Uart, console: Console) -> ConsoleUart {
        ConsoleUart { uart, console }
    }

    fn drain(&mut self) {
        let out = self.uart.take_output();
        self.console.write(&out);
    }
}

impl DeviceModel for ConsoleUart {
    fn kind(&self) -> &'static str {
        self.uart.kind()
    }

    fn read(&mut self, space: Space, offset: u64, size: AccessSize) -> Result<u64, DeviceError> {
        // A read may move queued input, never output; no drain needed.
        self.uart.read(space, offset, size)
    }

    fn write(
        &mut self,
        space: Space,
        offset: u64,
        size: AccessSize,
        data: u64,
    ) -> Result<(), DeviceError> {
        let r = self.uart.write(space, offset, size, data);
        self.drain();
        r
    }

    fn tick(&mut self, now_ns: u64) -> Option<u64> {
        let next = self.uart.tick(now_ns);
        self.drain();
        next
    }

    fn take_irq(&mut self) -> Option<IrqEvent> {
        self.uart.take_irq()
    }

    fn take_event(&mut self) -> Option<ModelEvent> {
        self.uart.take_event()
    }

    fn snapshot(&self) -> Snapshot {
        self.uart.snapshot()
    }

    fn restore(&mut self, snap: &Snapshot) -> Result<(), SnapshotError> {
        self.uart.restore(snap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collects_and_waits() {
        let c = Console::new();
        let c2 = c.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            c2.write(b"hello DEVPLANE-");
            c2.write(b"INIT-OK\n");
        });
        assert!(c.wait_for("DEVPLANE-INIT-OK", Duration::from_secs(5)));
        t.join().unwrap();
        assert!(!c.wait_for("absent", Duration::from_millis(10)));
        assert_eq!(c.text(), "hello DEVPLANE-INIT-OK\n");
        assert!(c.contains("hello"));
    }

    #[test]
    fn uart_output_reaches_the_console() {
        let c = Console::new();
        let mut u = ConsoleUart::new(Uart::new(4), c.clone());
        for b in b"ok\n" {
            u.write(Space::Pio, 0, AccessSize::B1, u64::from(*b))
                .unwrap();
        }
        assert_eq!(c.bytes(), b"ok\n");
        assert_eq!(u.kind(), "uart");
    }
}
