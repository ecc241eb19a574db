//! A client's tag keys changed on a running server (a key rotation).

use devplane_control::config::ClientKey;
use devplane_wire::tag::KeyRing;

use crate::lifecycle::WorkerCmd;
use crate::{Server, ServerError};

impl Server {
    /// Verifies the tags of client `client`'s datagrams with `keys` from
    /// now on, in every worker (`None`: the client sends untagged
    /// datagrams). A rotation is two calls: the new key with the previous
    /// one beside it (both accepted; answers are sealed with their
    /// request's key, interrupts with the key the client last used), then,
    /// after the grace period, the new key alone.
    pub fn set_keys(&mut self, client: u32, keys: Option<KeyRing>) -> Result<(), ServerError> {
        let entry = self
            .cfg
            .clients
            .iter_mut()
            .find(|c| c.id == client)
            .ok_or_else(|| {
                ServerError::Config(format!("client {client} is not registered on this server"))
            })?;
        entry.tag_key = keys.clone().map(|k| ClientKey(k.current));
        self.broadcast(|| WorkerCmd::SetKeys {
            client,
            keys: keys.clone(),
        })
    }
}
