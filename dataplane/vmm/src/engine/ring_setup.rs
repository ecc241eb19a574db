//! A lane's io_uring and the memory it sends from and receives into.

use devplane_wire::MAX_DATAGRAM;
use io_uring::IoUring;

use super::EngineError;

/// Submission queue entries per lane.
const RING_ENTRIES: u32 = 256;
/// Bytes per receive buffer.
pub(crate) const BUF_SIZE: usize = 2048;
/// Receive buffers per socket.
pub(crate) const BUFS_PER_SOCKET: u16 = 64;
/// Registered send buffers per lane.
pub(crate) const SEND_BUFS: usize = 256;
/// Bytes per send buffer (a whole datagram).
pub(crate) const SEND_SLOT: usize = 1536;
const _: () = assert!(SEND_SLOT >= MAX_DATAGRAM);

/// Builds a lane's io_uring, owned by the one thread that steps it
/// (`IORING_SETUP_SINGLE_ISSUER | DEFER_TASKRUN | TASKRUN_FLAG`, Linux
/// 6.1+), created disabled: the kernel records its single issuer when that
/// thread enables it ([`super::lane::Loop::start`]). A kernel without
/// `DEFER_TASKRUN` is refused ([`EngineError::NoOwnedRings`]).
pub(crate) fn build_ring() -> Result<IoUring, EngineError> {
    let mut b = IoUring::builder();
    b.setup_single_issuer()
        .setup_defer_taskrun()
        .setup_taskrun_flag()
        .setup_r_disabled();
    match b.build(RING_ENTRIES) {
        Ok(r) => Ok(r),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Err(EngineError::NoOwnedRings(e)),
        Err(e) => Err(EngineError::Ring(e)),
    }
}

/// The lane's send buffers, `SEND_BUFS` of `SEND_SLOT` bytes, registered
/// with `ring` (IORING_REGISTER_BUFFERS) where the kernel allows it; and
/// whether it did. The pool must outlive the ring's use of it: its owner
/// drops the ring first.
pub(crate) fn send_pool(ring: &IoUring) -> (Box<[u8]>, bool) {
    let mut pool = vec![0u8; SEND_BUFS * SEND_SLOT].into_boxed_slice();
    let iovecs: Vec<libc::iovec> = pool
        .chunks_exact_mut(SEND_SLOT)
        .map(|c| libc::iovec {
            iov_base: c.as_mut_ptr() as *mut libc::c_void,
            iov_len: SEND_SLOT,
        })
        .collect();
    // SAFETY: the iovecs point into `pool`, whose heap memory stays put
    // when the box moves; its owner drops the ring before it (see above),
    // so the registration never outlives the memory. If registration is
    // refused (memlock limits), sends still work from the same memory,
    // unregistered.
    let registered = unsafe { ring.submitter().register_buffers(&iovecs) }.is_ok();
    (pool, registered)
}

/// One socket's receive buffers (provided to the kernel by the lane).
pub(crate) fn recv_pool() -> Box<[u8]> {
    vec![0u8; BUF_SIZE * BUFS_PER_SOCKET as usize].into_boxed_slice()
}
