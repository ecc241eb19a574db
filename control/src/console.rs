//! The operator's side of a VM's console (`dpctl vms console`): the detach
//! key and the scan of typed bytes for it. Pure code; dpctl moves the
//! bytes between the terminal and the server's console stream
//! ([`crate::proto::Request::Console`]).
//!
//! The detach key is one control character, Ctrl-] by default (as
//! `telnet` and `virsh console`), written `^]`, `ctrl-]` or `0x1d`
//! (`--escape`): everything typed before it is sent, and dpctl detaches;
//! the guest never sees the key itself.

/// The default detach key: Ctrl-] (0x1d).
pub const DEFAULT_ESCAPE: u8 = 0x1d;

/// Why a detach key could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "detach key {0:?} is not a control character: write it as ^X or ctrl-X (X one of @, A-Z, [, \\, ], ^, _) or as a hex byte 0x01-0x1f"
)]
pub struct BadEscape(pub String);

/// Parses a detach key: `^]`, `ctrl-]` (any case), or `0x1d`. Only
/// control characters (0x00-0x1f) are accepted: a printable key would
/// make that character impossible to type.
pub fn parse_escape(text: &str) -> Result<u8, BadEscape> {
    let bad = || BadEscape(text.to_string());
    let t = text.trim();
    let lower = t.to_ascii_lowercase();
    let key = if let Some(rest) = t.strip_prefix('^') {
        rest
    } else if lower.starts_with("ctrl-") || lower.starts_with("ctrl+") {
        &t[5..]
    } else if let Some(hex) = lower.strip_prefix("0x") {
        let v = u8::from_str_radix(hex, 16).map_err(|_| bad())?;
        return if (0x01..0x20).contains(&v) {
            Ok(v)
        } else {
            Err(bad())
        };
    } else {
        return Err(bad());
    };
    let mut chars = key.chars();
    match (chars.next(), chars.next()) {
        (Some(c), None) if c.is_ascii() => {
            let c = c.to_ascii_uppercase() as u8;
            if (b'@'..=b'_').contains(&c) {
                Ok(c - b'@')
            } else {
                Err(bad())
            }
        }
        _ => Err(bad()),
    }
}

/// How a detach key is shown: `^]`.
pub fn show_escape(key: u8) -> String {
    if key < 0x20 {
        format!("^{}", (key + b'@') as char)
    } else {
        format!("{:#04x}", key)
    }
}

/// What [`scan`] found in one read of the operator's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scan<'a> {
    /// The bytes to send to the guest: everything before the detach key.
    pub forward: &'a [u8],
    /// The operator typed the detach key (after `forward` is sent, dpctl
    /// detaches; what followed the key is dropped).
    pub detach: bool,
}

/// Scans one read of typed bytes for the detach key `key`. A terminal in
/// raw mode delivers the key alone as soon as it is pressed, so the key
/// detaches at once (no state across reads, no second key to wait for).
pub fn scan(input: &[u8], key: u8) -> Scan<'_> {
    match input.iter().position(|&b| b == key) {
        Some(i) => Scan {
            forward: &input[..i],
            detach: true,
        },
        None => Scan {
            forward: input,
            detach: false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_keys_parse_in_every_spelling() {
        assert_eq!(parse_escape("^]"), Ok(0x1d));
        assert_eq!(parse_escape("ctrl-]"), Ok(0x1d));
        assert_eq!(parse_escape("Ctrl+]"), Ok(0x1d));
        assert_eq!(parse_escape("^a"), Ok(0x01));
        assert_eq!(parse_escape("^A"), Ok(0x01));
        assert_eq!(parse_escape("ctrl-x"), Ok(0x18));
        assert_eq!(parse_escape("^_"), Ok(0x1f));
        assert_eq!(parse_escape("0x1d"), Ok(0x1d));
        assert_eq!(parse_escape(" ^] "), Ok(0x1d));
        for bad in [
            "", "]", "^", "^ab", "ctrl-", "q", "0x41", "0x00", "0x", "0xzz", "^1", "^é",
        ] {
            let e = parse_escape(bad).unwrap_err();
            assert!(e.to_string().contains("control character"), "{bad:?}: {e}");
        }
        assert_eq!(show_escape(0x1d), "^]");
        assert_eq!(show_escape(0x01), "^A");
        assert_eq!(parse_escape(&show_escape(0x18)), Ok(0x18));
    }

    #[test]
    fn the_key_detaches_after_what_came_before_it() {
        assert_eq!(
            scan(b"ls\r", DEFAULT_ESCAPE),
            Scan {
                forward: b"ls\r",
                detach: false
            }
        );
        assert_eq!(
            scan(b"ab\x1dcd", DEFAULT_ESCAPE),
            Scan {
                forward: b"ab",
                detach: true
            }
        );
        // Alone, as a raw terminal delivers it.
        assert_eq!(
            scan(b"\x1d", DEFAULT_ESCAPE),
            Scan {
                forward: b"",
                detach: true
            }
        );
        // Other control characters (Ctrl-C, Ctrl-D, escape sequences) pass
        // to the guest; another key detaches instead.
        let s = scan(b"\x03\x04\x1b[A", DEFAULT_ESCAPE);
        assert_eq!((s.forward, s.detach), (&b"\x03\x04\x1b[A"[..], false));
        let s = scan(b"\x03\x01\x1d", 0x01);
        assert_eq!((s.forward, s.detach), (&b"\x03"[..], true));
        assert!(!scan(b"", DEFAULT_ESCAPE).detach);
    }
}
