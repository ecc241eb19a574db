//! The etcd key layout (pure code: no I/O).
//!
//! ```text
//! /devplane/v1/d/meta                 {"format":1}  (touched by every change:
//!                                     its mod-revision is the store's revision)
//! /devplane/v1/d/client/0000000007    one JSON entity per key (db::Client, ...)
//! /devplane/v1/d/hypervisor/...       hypervisor, vm, model, server likewise
//! /devplane/v1/agents/server/1        an agent's report, under its lease
//! /devplane/v1/agents/client/7
//! ```
//!
//! Ids are zero-padded to ten digits so that keys sort by id.

use std::collections::BTreeMap;

use crate::db::{Kind, State};

use super::{AgentKind, StoreError};

/// Every data key starts with this (what agents watch).
pub const DATA_PREFIX: &str = "/devplane/v1/d/";
/// The meta key.
pub const META_KEY: &str = "/devplane/v1/d/meta";
/// Every agent key starts with this.
pub const AGENTS_PREFIX: &str = "/devplane/v1/agents/";

const KINDS: [(Kind, &str); 5] = [
    (Kind::Client, "client"),
    (Kind::Hypervisor, "hypervisor"),
    (Kind::Vm, "vm"),
    (Kind::Model, "model"),
    (Kind::Server, "server"),
];

fn kind_segment(kind: Kind) -> &'static str {
    KINDS
        .iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, s)| *s)
        .unwrap_or("unknown")
}

/// The key of entity `kind` `id`.
pub fn entity_key(kind: Kind, id: u32) -> String {
    format!("{DATA_PREFIX}{}/{id:010}", kind_segment(kind))
}

/// The key of an agent's report.
pub fn agent_key(kind: AgentKind, id: u32) -> String {
    format!("{AGENTS_PREFIX}{}/{id}", kind.name())
}

/// What a data key names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataKey {
    /// The meta key.
    Meta,
    /// An entity.
    Entity(Kind, u32),
}

/// Parses a data key.
pub fn parse_key(key: &str) -> Result<DataKey, StoreError> {
    let corrupt = |m: &str| StoreError::Corrupt {
        key: key.to_string(),
        message: m.to_string(),
    };
    if key == META_KEY {
        return Ok(DataKey::Meta);
    }
    let rest = key
        .strip_prefix(DATA_PREFIX)
        .ok_or_else(|| corrupt("not a devplane data key"))?;
    let (seg, id) = rest
        .split_once('/')
        .ok_or_else(|| corrupt("no entity id"))?;
    let kind = KINDS
        .iter()
        .find(|(_, s)| *s == seg)
        .map(|(k, _)| *k)
        .ok_or_else(|| corrupt("unknown entity kind"))?;
    let id: u32 = id.parse().map_err(|_| corrupt("the id is not a number"))?;
    Ok(DataKey::Entity(kind, id))
}

/// Every entity of `state` as key -> JSON value.
pub fn encode(state: &State) -> BTreeMap<String, Vec<u8>> {
    fn put<T: serde::Serialize>(
        out: &mut BTreeMap<String, Vec<u8>>,
        kind: Kind,
        list: &[T],
        id: impl Fn(&T) -> u32,
    ) {
        for x in list {
            out.insert(
                entity_key(kind, id(x)),
                serde_json::to_vec(x).expect("entities serialise"),
            );
        }
    }
    let mut out = BTreeMap::new();
    put(&mut out, Kind::Client, &state.clients, |x| x.id);
    put(&mut out, Kind::Hypervisor, &state.hypervisors, |x| x.id);
    put(&mut out, Kind::Vm, &state.vms, |x| x.id);
    put(&mut out, Kind::Model, &state.models, |x| x.id);
    put(&mut out, Kind::Server, &state.servers, |x| x.id);
    out
}

/// One write of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Put this value at this key.
    Put(String, Vec<u8>),
    /// Delete this key.
    Delete(String),
}

/// The writes that turn `old` into `new`: a put for every entity added or
/// changed, a delete for every entity removed (in key order).
pub fn diff(old: &State, new: &State) -> Vec<Op> {
    let a = encode(old);
    let b = encode(new);
    let mut ops = Vec::new();
    for (k, v) in &b {
        if a.get(k) != Some(v) {
            ops.push(Op::Put(k.clone(), v.clone()));
        }
    }
    for k in a.keys() {
        if !b.contains_key(k) {
            ops.push(Op::Delete(k.clone()));
        }
    }
    ops
}

fn upsert<T: serde::de::DeserializeOwned>(
    list: &mut Vec<T>,
    key: &str,
    value: &[u8],
    id: u32,
    get: impl Fn(&T) -> u32,
) -> Result<(), StoreError> {
    let x: T = serde_json::from_slice(value).map_err(|e| StoreError::Corrupt {
        key: key.to_string(),
        message: e.to_string(),
    })?;
    if get(&x) != id {
        return Err(StoreError::Corrupt {
            key: key.to_string(),
            message: format!("holds id {} under id {id}", get(&x)),
        });
    }
    match list.binary_search_by_key(&id, &get) {
        Ok(i) => list[i] = x,
        Err(i) => list.insert(i, x),
    }
    Ok(())
}

fn delete<T>(list: &mut Vec<T>, id: u32, get: impl Fn(&T) -> u32) {
    if let Ok(i) = list.binary_search_by_key(&id, get) {
        list.remove(i);
    }
}

/// Applies one key's new value (`None`: deleted) to `state`, keeping each
/// list sorted by id. The meta key is ignored here.
pub fn apply_kv(state: &mut State, key: &str, value: Option<&[u8]>) -> Result<(), StoreError> {
    let DataKey::Entity(kind, id) = parse_key(key)? else {
        return Ok(());
    };
    match (kind, value) {
        (Kind::Client, Some(v)) => upsert(&mut state.clients, key, v, id, |x| x.id),
        (Kind::Hypervisor, Some(v)) => upsert(&mut state.hypervisors, key, v, id, |x| x.id),
        (Kind::Vm, Some(v)) => upsert(&mut state.vms, key, v, id, |x| x.id),
        (Kind::Model, Some(v)) => upsert(&mut state.models, key, v, id, |x| x.id),
        (Kind::Server, Some(v)) => upsert(&mut state.servers, key, v, id, |x| x.id),
        (Kind::Client, None) => {
            delete(&mut state.clients, id, |x| x.id);
            Ok(())
        }
        (Kind::Hypervisor, None) => {
            delete(&mut state.hypervisors, id, |x| x.id);
            Ok(())
        }
        (Kind::Vm, None) => {
            delete(&mut state.vms, id, |x| x.id);
            Ok(())
        }
        (Kind::Model, None) => {
            delete(&mut state.models, id, |x| x.id);
            Ok(())
        }
        (Kind::Server, None) => {
            delete(&mut state.servers, id, |x| x.id);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::db::{Change, Client, Hypervisor, Model, Server, Vm, VmState};

    fn sample() -> State {
        let changes = [
            Change::AddClient(Client {
                id: 7,
                address: Ipv4Addr::new(10, 0, 0, 7),
                budget: None,
                tag_key: None,
            }),
            Change::AddHypervisor(Hypervisor { id: 70, client: 7 }),
            Change::AddVm(Vm {
                id: 1,
                hypervisor: 70,
                client: 7,
                state: VmState::Stopped,
            }),
            Change::AddServer(Server {
                id: 2,
                address: Ipv4Addr::new(10, 0, 0, 2),
            }),
            Change::AddModel(Model {
                id: 42,
                kind: "counter".into(),
                server: 2,
                worker: 0,
                line: None,
                vm: Some(1),
                pio_base: Some(0x3f8),
                mmio_base: None,
                backing: None,
                via: None,
            }),
        ];
        State::default().changed_many(&changes).unwrap()
    }

    #[test]
    fn keys_round_trip_and_sort_by_id() {
        assert_eq!(
            entity_key(Kind::Vm, 12),
            "/devplane/v1/d/vm/0000000012".to_string()
        );
        assert!(entity_key(Kind::Vm, 9) < entity_key(Kind::Vm, 10));
        assert_eq!(
            parse_key(&entity_key(Kind::Model, 42)).unwrap(),
            DataKey::Entity(Kind::Model, 42)
        );
        assert_eq!(parse_key(META_KEY).unwrap(), DataKey::Meta);
        for bad in [
            "/x",
            "/devplane/v1/d/vm",
            "/devplane/v1/d/cat/1",
            "/devplane/v1/d/vm/x",
        ] {
            assert!(
                matches!(parse_key(bad), Err(StoreError::Corrupt { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn diff_then_events_rebuild_the_new_state() {
        let old = sample();
        let new = old
            .changed_many(&[
                Change::PlaceModel {
                    model: 42,
                    server: 2,
                    worker: 1,
                },
                Change::SetVmState(1, VmState::Running),
            ])
            .unwrap();
        let ops = diff(&old, &new);
        assert_eq!(ops.len(), 2, "{ops:?}");
        let mut replay = old.clone();
        for op in &ops {
            match op {
                Op::Put(k, v) => apply_kv(&mut replay, k, Some(v)).unwrap(),
                Op::Delete(k) => apply_kv(&mut replay, k, None).unwrap(),
            }
        }
        assert_eq!(replay, new);
        // And back (the model removed: a delete).
        let gone = new.changed(&Change::RemoveModel(42)).unwrap();
        let ops = diff(&new, &gone);
        assert_eq!(ops, vec![Op::Delete(entity_key(Kind::Model, 42))]);
        let mut replay = new.clone();
        apply_kv(&mut replay, &entity_key(Kind::Model, 42), None).unwrap();
        assert_eq!(replay, gone);
    }

    #[test]
    fn a_value_under_the_wrong_id_or_garbage_is_refused() {
        let mut s = State::default();
        let v = br#"{"id":3,"address":"10.0.0.3"}"#;
        assert!(apply_kv(&mut s, &entity_key(Kind::Client, 4), Some(v)).is_err());
        assert!(apply_kv(&mut s, &entity_key(Kind::Client, 4), Some(b"{")).is_err());
        apply_kv(&mut s, &entity_key(Kind::Client, 3), Some(v)).unwrap();
        assert_eq!(s.clients.len(), 1);
    }
}
