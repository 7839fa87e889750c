//! Memory and table bounds for one guest, with a record of which bound was
//! hit so the failure can be named.

use spare_core::limits::{MAX_INSTANCES, MAX_MEMORIES, MAX_TABLE_ELEMENTS, MAX_TABLES};
use wasmtime::ResourceLimiter;

/// Enforces [`Limits::memory`](spare_core::Limits::memory) over the sum of all
/// linear memories, and the fixed table and instance bounds.
#[derive(Debug)]
pub(crate) struct GuestLimiter {
    /// Bytes of linear memory the guest may hold in all.
    memory_limit: u64,
    /// Bytes it holds now, summed over its memories.
    memory_used: u64,
    /// Set when a growth was refused, so a resulting trap reads as the limit.
    pub(crate) memory_exceeded: bool,
}

impl GuestLimiter {
    pub(crate) fn new(memory_limit: u64) -> Self {
        Self {
            memory_limit,
            memory_used: 0,
            memory_exceeded: false,
        }
    }
}

impl ResourceLimiter for GuestLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Past the memory's own declared maximum the growth fails after
        // this call (`memory.grow` returns -1), and nothing says so but
        // `memory_grow_failed`, which cannot tell that failure from one
        // that came before this call: refused here, it is never counted.
        if maximum.is_some_and(|maximum| desired > maximum) {
            return Ok(false);
        }
        let growth = (desired as u64).saturating_sub(current as u64);
        let total = self.memory_used.saturating_add(growth);
        if total > self.memory_limit {
            self.memory_exceeded = true;
            // Trap rather than return -1 from `memory.grow`: a guest that
            // ignores failed allocations would otherwise spin until it runs
            // out of fuel, and the user would never learn the real cause.
            return Err(wasmtime::format_err!(
                "memory limit of {} bytes exceeded",
                self.memory_limit
            ));
        }
        self.memory_used = total;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }

    fn instances(&self) -> usize {
        MAX_INSTANCES
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_is_summed_across_memories() {
        let mut limiter = GuestLimiter::new(100);
        assert!(limiter.memory_growing(0, 60, None).unwrap());
        assert!(limiter.memory_growing(0, 40, None).unwrap());
        assert!(limiter.memory_growing(40, 41, None).is_err());
        assert!(limiter.memory_exceeded);
    }

    #[test]
    fn growth_past_a_memorys_own_maximum_is_refused_and_not_counted() {
        let mut limiter = GuestLimiter::new(100);
        // A memory declared to hold at most 50 bytes, asked for 90: the
        // guest sees -1, and may still use the rest of its limit.
        assert!(!limiter.memory_growing(10, 90, Some(50)).unwrap());
        assert!(!limiter.memory_exceeded);
        assert!(limiter.memory_growing(0, 100, None).unwrap());
    }

    #[test]
    fn tables_are_bounded() {
        let mut limiter = GuestLimiter::new(0);
        assert!(limiter.table_growing(0, MAX_TABLE_ELEMENTS, None).unwrap());
        assert!(
            !limiter
                .table_growing(0, MAX_TABLE_ELEMENTS + 1, None)
                .unwrap()
        );
    }
}
