//! [`Invalid`]: a value, option or file that cannot be used, as one line
//! saying what to change (command-line values, `--max-regress` limits,
//! `summary.json` files, throughput matrices).

use std::fmt;

/// A value that cannot be used; its message is one line saying what to
/// change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid(pub String);

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Invalid {}

impl From<String> for Invalid {
    fn from(s: String) -> Invalid {
        Invalid(s)
    }
}

impl From<&str> for Invalid {
    fn from(s: &str) -> Invalid {
        Invalid(s.to_string())
    }
}
