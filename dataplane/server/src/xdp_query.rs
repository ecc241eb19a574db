//! Which XDP program an interface has attached, asked of the kernel over
//! rtnetlink (`RTM_GETLINK`, attribute `IFLA_XDP`), so that an XDP-mode
//! server refuses an interface another program (another server's, say)
//! already steers instead of replacing it.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_HDRLEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;
const IFLA_XDP: u16 = 43;
const IFLA_XDP_PROG_ID: u16 = 4;
/// Attribute type bits that are flags (`NLA_F_NESTED`, `NLA_F_NET_BYTEORDER`).
const NLA_TYPE_MASK: u16 = 0x3fff;

/// An XDP program attached to an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    /// Its kernel id.
    pub id: u32,
    /// Its name, if the kernel still lists it.
    pub name: Option<String>,
}

impl std::fmt::Display for Attached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.name {
            Some(n) => write!(f, "program {} (id {})", n, self.id),
            None => write!(f, "program id {}", self.id),
        }
    }
}

/// The XDP program attached to interface `ifname` (in this network
/// namespace), if any.
pub fn attached(ifname: &str) -> io::Result<Option<Attached>> {
    let c = CString::new(ifname).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `c` is a valid NUL-terminated string for the call's duration.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    let Some(id) = query_prog_id(index)? else {
        return Ok(None);
    };
    let name = aya::programs::loaded_programs()
        .flatten()
        .find(|p| p.id() == id)
        .and_then(|p| p.name_as_str().map(str::to_owned));
    Ok(Some(Attached { id, name }))
}

/// The MTU of interface `ifname` (in this network namespace).
pub fn mtu(ifname: &str) -> io::Result<usize> {
    if ifname.len() >= libc::IFNAMSIZ || ifname.contains('\0') {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned here alone.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero ifreq is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(ifname.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: SIOCGIFMTU reads the NUL-terminated name (checked shorter
    // than IFNAMSIZ, the rest zeros) and writes the MTU into the union.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFMTU, &mut req) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel filled `ifru_mtu` on success.
    Ok(unsafe { req.ifr_ifru.ifru_mtu }.max(0) as usize)
}

fn query_prog_id(index: u32) -> io::Result<Option<u32>> {
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = [0u8; NLMSG_HDRLEN + IFINFOMSG_LEN];
    req[0..4].copy_from_slice(&((NLMSG_HDRLEN + IFINFOMSG_LEN) as u32).to_ne_bytes());
    req[4..6].copy_from_slice(&RTM_GETLINK.to_ne_bytes());
    req[6..8].copy_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes());
    req[NLMSG_HDRLEN] = libc::AF_UNSPEC as u8;
    req[NLMSG_HDRLEN + 4..NLMSG_HDRLEN + 8].copy_from_slice(&(index as i32).to_ne_bytes());
    // SAFETY: `req` is valid for `req.len()` bytes; the fd is open.
    let sent = unsafe { libc::send(sock.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes; the fd is open.
    let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    parse_reply(&buf[..n as usize])
}

fn bad(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("rtnetlink reply: {what}"),
    )
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The attributes in `b`: (type without flag bits, payload).
fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = u16_at(b, 0)? as usize;
        let ty = u16_at(b, 2)? & NLA_TYPE_MASK;
        if len < 4 || len > b.len() {
            return None;
        }
        let payload = &b[4..len];
        b = b.get(len.next_multiple_of(4)..).unwrap_or(&[]);
        Some((ty, payload))
    })
}

/// The `IFLA_XDP_PROG_ID` in an `RTM_NEWLINK` reply (none or 0: nothing
/// attached).
fn parse_reply(b: &[u8]) -> io::Result<Option<u32>> {
    let len = u32_at(b, 0).ok_or_else(|| bad("short"))? as usize;
    let ty = u16_at(b, 4).ok_or_else(|| bad("short"))?;
    if len > b.len() || len < NLMSG_HDRLEN {
        return Err(bad("bad length"));
    }
    if ty == NLMSG_ERROR {
        let errno = u32_at(b, NLMSG_HDRLEN).ok_or_else(|| bad("short error"))? as i32;
        return Err(io::Error::from_raw_os_error(-errno));
    }
    if ty != RTM_NEWLINK {
        return Err(bad("not a link message"));
    }
    let body = b
        .get(NLMSG_HDRLEN + IFINFOMSG_LEN..len)
        .ok_or_else(|| bad("short link message"))?;
    let id = attrs(body)
        .find(|(t, _)| *t == IFLA_XDP)
        .and_then(|(_, xdp)| attrs(xdp).find(|(t, _)| *t == IFLA_XDP_PROG_ID))
        .and_then(|(_, p)| u32_at(p, 0));
    Ok(id.filter(|&id| id != 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(ty: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        v.extend_from_slice(&ty.to_ne_bytes());
        v.extend_from_slice(payload);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v
    }

    fn reply(attrs: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8; NLMSG_HDRLEN + IFINFOMSG_LEN];
        v.extend_from_slice(attrs);
        let len = v.len() as u32;
        v[0..4].copy_from_slice(&len.to_ne_bytes());
        v[4..6].copy_from_slice(&RTM_NEWLINK.to_ne_bytes());
        v
    }

    #[test]
    fn finds_the_program_id_in_a_nested_xdp_attribute() {
        let mut xdp = attr(2, &[1]);
        xdp.extend(attr(IFLA_XDP_PROG_ID, &77u32.to_ne_bytes()));
        let mut a = attr(3, b"eth0\0");
        a.extend(attr(IFLA_XDP | 0x8000, &xdp));
        assert_eq!(parse_reply(&reply(&a)).unwrap(), Some(77));
        assert_eq!(parse_reply(&reply(&attr(3, b"eth0\0"))).unwrap(), None);
    }

    #[test]
    fn truncated_or_lying_replies_are_errors_or_nothing() {
        assert!(parse_reply(&[1, 2]).is_err());
        let mut r = reply(&attr(IFLA_XDP, &attr(IFLA_XDP_PROG_ID, &[9])));
        assert_eq!(parse_reply(&r).unwrap(), None, "short id");
        r[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(parse_reply(&r).is_err());
        let mut bad_attr = reply(&[]);
        bad_attr.extend_from_slice(&[200, 0, 43, 0]);
        let len = bad_attr.len() as u32;
        bad_attr[0..4].copy_from_slice(&len.to_ne_bytes());
        assert_eq!(parse_reply(&bad_attr).unwrap(), None);
    }
}
