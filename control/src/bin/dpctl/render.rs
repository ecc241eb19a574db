//! How dpctl prints the database: tables for people, JSON for scripts.

use super::*;

pub(super) fn ids(deps: &[(Kind, u32)], kind: Kind) -> Vec<u32> {
    deps.iter()
        .filter(|(k, _)| *k == kind)
        .map(|&(_, id)| id)
        .collect()
}

pub(super) fn id_list(ids: &[u32]) -> String {
    if ids.is_empty() {
        return "-".to_string();
    }
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

pub(super) fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

pub(super) fn hex<T: std::fmt::LowerHex>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:#x}"))
}

/// The relations `show` adds to an entity: (JSON key, kind, ids).
pub(super) fn relations(s: &State, kind: Kind, id: u32) -> Vec<(&'static str, Vec<u32>)> {
    let deps = s.dependents(kind, id);
    match kind {
        Kind::Client => vec![
            ("hypervisors", ids(&deps, Kind::Hypervisor)),
            ("vms", ids(&deps, Kind::Vm)),
        ],
        Kind::Hypervisor => vec![("vms", ids(&deps, Kind::Vm))],
        Kind::Vm => vec![("models", ids(&deps, Kind::Model))],
        Kind::Server => vec![("models", ids(&deps, Kind::Model))],
        Kind::Model => vec![],
    }
}

/// The table columns of a kind and one row per entity.
pub(super) fn rows(s: &State, kind: Kind) -> (Vec<&'static str>, Vec<(u32, Vec<String>)>) {
    let rel = |kind, id| {
        relations(s, kind, id)
            .into_iter()
            .map(|(_, ids)| id_list(&ids))
            .collect::<Vec<_>>()
    };
    match kind {
        Kind::Client => (
            vec!["ID", "ADDRESS", "HYPERVISORS", "VMS"],
            s.clients
                .iter()
                .map(|c| {
                    let mut r = vec![c.id.to_string(), c.address.to_string()];
                    r.extend(rel(kind, c.id));
                    (c.id, r)
                })
                .collect(),
        ),
        Kind::Hypervisor => (
            vec!["ID", "CLIENT", "VMS"],
            s.hypervisors
                .iter()
                .map(|h| {
                    let mut r = vec![h.id.to_string(), h.client.to_string()];
                    r.extend(rel(kind, h.id));
                    (h.id, r)
                })
                .collect(),
        ),
        Kind::Vm => (
            vec!["ID", "HYPERVISOR", "CLIENT", "STATE", "MODELS"],
            s.vms
                .iter()
                .map(|v| {
                    let mut r = vec![
                        v.id.to_string(),
                        v.hypervisor.to_string(),
                        v.client.to_string(),
                        v.state.to_string(),
                    ];
                    r.extend(rel(kind, v.id));
                    (v.id, r)
                })
                .collect(),
        ),
        Kind::Model => (
            vec![
                "ID",
                "KIND",
                "SERVER",
                "WORKER",
                "LINE",
                "VM",
                "PIO_BASE",
                "MMIO_BASE",
            ],
            s.models
                .iter()
                .map(|m| {
                    (
                        m.id,
                        vec![
                            m.id.to_string(),
                            m.kind.clone(),
                            m.server.to_string(),
                            m.worker.to_string(),
                            opt(m.line),
                            opt(m.vm),
                            hex(m.pio_base),
                            hex(m.mmio_base),
                        ],
                    )
                })
                .collect(),
        ),
        Kind::Server => (
            vec!["ID", "ADDRESS", "MODELS"],
            s.servers
                .iter()
                .map(|sv| {
                    let mut r = vec![sv.id.to_string(), sv.address.to_string()];
                    r.extend(rel(kind, sv.id));
                    (sv.id, r)
                })
                .collect(),
        ),
    }
}

/// One entity as JSON, with its relations.
pub(super) fn entity_json(s: &State, kind: Kind, id: u32) -> Option<Value> {
    let mut v = match kind {
        Kind::Client => serde_json::to_value(s.client(id)?),
        Kind::Hypervisor => serde_json::to_value(s.hypervisor(id)?),
        Kind::Vm => serde_json::to_value(s.vm(id)?),
        Kind::Model => serde_json::to_value(s.model(id)?),
        Kind::Server => serde_json::to_value(s.server(id)?),
    }
    .expect("entities serialise");
    if let Value::Object(map) = &mut v {
        // A key is never printed: its id and fingerprint only.
        if let Some(k) = s
            .client(id)
            .filter(|_| kind == Kind::Client)
            .and_then(|c| c.tag_key.clone())
        {
            map.insert(
                "tag_key".into(),
                json!({"id": k.0.id, "fingerprint": k.0.fingerprint().to_string()}),
            );
        }
        for (key, ids) in relations(s, kind, id) {
            map.insert(key.to_string(), json!(ids));
        }
    }
    Some(v)
}

pub(super) fn list(s: &State, kind: Kind, json: bool) -> String {
    let (headers, rows) = rows(s, kind);
    if json {
        let all: Vec<Value> = rows
            .iter()
            .filter_map(|(id, _)| entity_json(s, kind, *id))
            .collect();
        return to_json(&Value::Array(all));
    }
    table(&headers, rows.into_iter().map(|(_, r)| r).collect())
}

pub(super) fn show(s: &State, kind: Kind, id: u32, json: bool) -> Result<String, Failure> {
    let not_found = || Failure::from(DbError::NotFound { kind, id });
    if json {
        return entity_json(s, kind, id)
            .map(|v| to_json(&v))
            .ok_or_else(not_found);
    }
    let (headers, rows) = rows(s, kind);
    let (_, row) = rows
        .into_iter()
        .find(|(i, _)| *i == id)
        .ok_or_else(not_found)?;
    let pairs: Vec<(String, String)> = headers
        .iter()
        .map(|h| h.to_lowercase().replace('_', " "))
        .zip(row)
        .collect();
    Ok(key_values(&pairs))
}

pub(super) fn to_json(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).expect("JSON values serialise");
    s.push('\n');
    s
}

/// Left-aligned columns separated by two spaces.
pub(super) fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.zip(&widths).enumerate() {
            if i > 0 {
                l.push_str("  ");
            }
            l.push_str(cell);
            l.extend(std::iter::repeat_n(
                ' ',
                w.saturating_sub(cell.chars().count()),
            ));
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut headers.iter().copied());
    for r in &rows {
        line(&mut r.iter().map(String::as_str));
    }
    out
}

/// `key  value` lines with the values aligned.
pub(super) fn key_values<K: AsRef<str>>(pairs: &[(K, String)]) -> String {
    let width = pairs
        .iter()
        .map(|(k, _)| k.as_ref().len())
        .max()
        .unwrap_or(0);
    pairs
        .iter()
        .map(|(k, v)| format!("{:<width$}  {v}\n", k.as_ref()))
        .collect()
}
