//! The tag keys tests give their clients: tags are on in the end-to-end
//! topology unless a test says otherwise.

use devplane_control::config::ClientKey;
use devplane_wire::tag::{KeyRing, TagKey};

/// Client `client`'s key in tests: key id 1, bytes derived from the id
/// (fixed, so a failure reproduces; different for every client).
pub fn client_key(client: u32) -> ClientKey {
    let mut bytes = [0u8; 16];
    let mut x = u64::from(client).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for b in bytes.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    ClientKey(TagKey::new(1, bytes))
}

/// A client daemon's CLIENT.toml `[client]` section (client `client`
/// sending from `bind`, tagged with [`client_key`]) and its one
/// `[[servers]]` entry (server `server` at `addr`): what a test's
/// configuration starts with, its `[[vms]]` to follow.
pub fn client_toml_header(
    client: u32,
    bind: std::net::Ipv4Addr,
    server: u32,
    addr: std::net::SocketAddrV4,
) -> String {
    format!(
        r#"
[client]
id = {client}
bind = "{bind}"
tag_key = "{key}"

[[servers]]
id = {server}
address = "{addr}"
"#,
        key = client_key(client).to_config_string(),
    )
}

/// [`client_key`] as an engine holds it.
pub fn client_ring(client: u32) -> KeyRing {
    KeyRing::new(client_key(client).0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn keys_differ_per_client() {
        assert_ne!(super::client_key(7), super::client_key(8));
        assert_eq!(super::client_key(7), super::client_key(7));
    }
}
