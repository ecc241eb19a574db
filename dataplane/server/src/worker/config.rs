//! The settings of a worker loop.

use std::time::Duration;

/// Settings of a worker loop.
#[derive(Debug, Clone, Copy)]
pub struct LoopConfig {
    /// This server's id.
    pub server: u32,
    /// Frames per poll at most.
    pub batch: u32,
    /// Empty polls before sleeping.
    pub spin_budget: u32,
    /// Longest sleep when idle.
    pub idle_sleep: Duration,
}
