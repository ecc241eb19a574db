//! `dpctl clients rotate-key`: a client platform's new tag key, saved in
//! the database and handed to its running servers and client daemon
//! without stopping its traffic.
//!
//! The order keeps every datagram acceptable to its receiver: (1) the
//! database takes the new key; (2) each server accepts both keys (it
//! answers each request under the request's key and seals interrupts
//! under the key the client last used); (3) the client daemon seals with
//! the new key and accepts both; (4) after the grace period, both accept
//! only the new key. A datagram still in flight under the old key after
//! the grace is dropped (`bad_tag`) and the client's retransmission,
//! sealed again under the new key, takes its place.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use devplane_control::config::ClientKey;
use devplane_control::db::{Change, Db, DbError, Kind, State};
use devplane_control::proto::{self, Request, Response};
use devplane_wire::tag::TagKey;
use serde_json::json;

use super::{Cli, EXIT_FAILED, Failure, to_json};

const TIMEOUT: Duration = Duration::from_secs(10);

/// `clients export-key`: client `client`'s current key as its TOML line
/// (or, with --json, `{"client", "key_id", "tag_key"}`); an error if the
/// client has none.
pub(super) fn export(s: &State, client: u32, json: bool) -> Result<String, Failure> {
    let c = s.client(client).ok_or(DbError::NotFound {
        kind: Kind::Client,
        id: client,
    })?;
    let Some(key) = c.tag_key.clone() else {
        return Err(failed(format!(
            "client {client} has no tag key (added with --no-key); give it one with              `dpctl clients rotate-key {client}`"
        )));
    };
    if json {
        return Ok(to_json(&json!({
            "client": client,
            "key_id": key.0.id,
            "tag_key": key.to_config_string(),
        })));
    }
    Ok(format!("tag_key = \"{}\"\n", key.to_config_string()))
}

/// What `rotate-key` was asked.
pub(super) struct Rotate<'a> {
    pub client: u32,
    pub grace: Duration,
    pub servers: &'a [PathBuf],
    pub tell_client: bool,
    pub db_only: bool,
}

fn failed(message: String) -> Failure {
    Failure {
        code: EXIT_FAILED,
        message,
    }
}

/// 16 bytes from the kernel's random source.
pub(super) fn random_key(id: u8) -> Result<TagKey, Failure> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| failed(format!("cannot read /dev/urandom for a new key: {e}")))?;
    Ok(TagKey::new(id, bytes))
}

/// The id after `old`'s (1..=255, wrapping; 1 for a first key).
pub(super) fn next_id(old: Option<&ClientKey>) -> u8 {
    match old {
        Some(k) if k.0.id < u8::MAX => k.0.id + 1,
        _ => 1,
    }
}

/// Sends `req` to every server and, if asked, the client daemon; the
/// first refusal or failure is returned, naming who and the state.
fn tell(cli: &Cli, r: &Rotate<'_>, req: &Request, step: &str) -> Result<(), Failure> {
    for path in r.servers {
        match proto::call(path, req, TIMEOUT) {
            Ok(Response::Ok) => {}
            Ok(Response::Error { message }) => {
                return Err(failed(format!(
                    "{step}: the server on {} refused: {message}",
                    path.display()
                )));
            }
            Ok(other) => {
                return Err(failed(format!(
                    "{step}: the server on {} answered {other:?}",
                    path.display()
                )));
            }
            Err(e) => return Err(failed(format!("{step}: {e}"))),
        }
    }
    if r.tell_client {
        match proto::call_client(&cli.client_socket, req, TIMEOUT) {
            Ok(Response::Ok) => {}
            Ok(Response::Error { message }) => {
                return Err(failed(format!(
                    "{step}: the client daemon refused: {message}"
                )));
            }
            Ok(other) => {
                return Err(failed(format!(
                    "{step}: the client daemon answered {other:?}"
                )));
            }
            Err(e) => return Err(failed(format!("{step}: {e}"))),
        }
    }
    Ok(())
}

/// Rotates client `r.client`'s key; the output line or JSON.
pub(super) fn rotate(cli: &Cli, db: &mut Db, r: &Rotate<'_>) -> Result<String, Failure> {
    let old = db
        .state()
        .client(r.client)
        .ok_or(DbError::NotFound {
            kind: Kind::Client,
            id: r.client,
        })?
        .tag_key
        .clone();
    let new = ClientKey(random_key(next_id(old.as_ref()))?);
    db.apply(Change::SetClientKey(r.client, Some(new.clone())))?;
    let generation = db.generation();
    if !r.db_only {
        let saved = format!(
            "the database holds key {} of client {} (generation {generation}); run rotate-key \
             again once every server and the client daemon listen",
            new.0.id, r.client
        );
        let both = Request::SetKeys {
            client: r.client,
            current: Some(new.clone()),
            previous: old.clone(),
        };
        tell(cli, r, &both, &format!("handing the new key out ({saved})"))?;
        std::thread::sleep(r.grace);
        let only_new = Request::SetKeys {
            client: r.client,
            current: Some(new.clone()),
            previous: None,
        };
        tell(
            cli,
            r,
            &only_new,
            &format!("retiring the old key ({saved})"),
        )?;
    }
    let fingerprint = new.0.fingerprint().to_string();
    if cli.json {
        return Ok(to_json(&json!({
            "action": "rotate-key",
            "client": r.client,
            "key_id": new.0.id,
            "fingerprint": fingerprint,
            "previous_key_id": old.map(|k| k.0.id),
            "generation": generation,
        })));
    }
    Ok(format!(
        "client {} now has key {} ({fingerprint}){} (generation {generation})\n",
        r.client,
        new.0.id,
        match old {
            Some(k) => format!(", key {} retired", k.0.id),
            None => String::new(),
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ids_go_round_1_to_255() {
        let k = |id| Some(ClientKey(TagKey::new(id, [0; 16])));
        assert_eq!(next_id(None), 1);
        assert_eq!(next_id(k(1).as_ref()), 2);
        assert_eq!(next_id(k(254).as_ref()), 255);
        assert_eq!(next_id(k(255).as_ref()), 1);
        let a = random_key(3).unwrap_or_else(|f| panic!("{}", f.message));
        let b = random_key(3).unwrap_or_else(|f| panic!("{}", f.message));
        assert_ne!(a.bytes(), b.bytes());
    }
}
