//! Who holds a UDP port: a socket-mode server refuses to start on a port
//! another process already serves (its workers' sockets share the port
//! with `SO_REUSEPORT`, which would otherwise let a second server join the
//! group silently and take its traffic).

use std::net::{SocketAddr, SocketAddrV4, UdpSocket};

/// A UDP address another process holds.
#[derive(Debug, thiserror::Error)]
#[error(
    "UDP {addr} is already served by {holder}: stop it, or give this server another port or \
     address"
)]
pub struct PortInUse {
    /// The address.
    pub addr: SocketAddrV4,
    /// `process <pid> (<name>)`, or "another process" if not found.
    pub holder: String,
}

/// Fails, naming the process that holds UDP `addr`, if one does: a plain
/// bind (without `SO_REUSEPORT`) of the same address is refused while any
/// socket holds it. Other bind errors are left to the real bind.
pub fn check_free(addr: SocketAddrV4) -> Result<(), PortInUse> {
    match UdpSocket::bind(SocketAddr::V4(addr)) {
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(PortInUse {
            addr,
            holder: holder(addr.port()).unwrap_or_else(|| "another process".to_string()),
        }),
        _ => Ok(()),
    }
}

/// `process <pid> (<name>)` of a process with a UDP socket on `port` in
/// this thread's network namespace, if one is found.
fn holder(port: u16) -> Option<String> {
    let table = std::fs::read_to_string("/proc/thread-self/net/udp").ok()?;
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local = f.get(1)?;
            let p = u16::from_str_radix(local.rsplit(':').next()?, 16).ok()?;
            let inode = f.get(9)?;
            (p == port).then(|| format!("socket:[{inode}]"))
        })
        .collect();
    if inodes.is_empty() {
        return None;
    }
    for proc in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = proc
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(proc.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|t| inodes.iter().any(|i| t.as_os_str() == i.as_str()))
        });
        if holds {
            let name = std::fs::read_to_string(proc.path().join("comm")).unwrap_or_default();
            return Some(format!("process {pid} ({})", name.trim()));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn a_held_port_is_refused_naming_its_holder() {
        let held = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let SocketAddr::V4(addr) = held.local_addr().unwrap() else {
            unreachable!("bound IPv4")
        };
        let e = check_free(addr).unwrap_err().to_string();
        assert!(
            e.contains(&format!("process {}", std::process::id())),
            "{e}"
        );
        drop(held);
        assert!(check_free(addr).is_ok());
    }
}
