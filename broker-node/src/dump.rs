//! `broker debug dump`: a data dir's identity, hard state, membership, log and snapshot,
//! read offline (no node is started, no lock taken, nothing changed), as text or JSON, like
//! `kafka-dump-log` for the metadata log.

use std::path::Path;

use consensus_api::{data_dir, Backend};
use serde_json::{json, Value};

use crate::cli::{CliError, ExitKind, Output};

/// A JSON array of node ids as `1,2,3` (`-` when empty).
fn ids(v: &Value) -> String {
    let set: std::collections::BTreeSet<u64> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_u64)
        .collect();
    if set.is_empty() {
        "-".into()
    } else {
        set.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
    }
}

/// What `dump` prints for data dir `dir`, read with `backend`: the JSON form.
pub fn report(backend: &dyn Backend, dir: &Path, entries: usize) -> Result<Value, CliError> {
    if !dir.is_dir() {
        return Err(CliError {
            kind: ExitKind::NotFound,
            message: format!("{} is not a directory", dir.display()),
        });
    }
    let failed = |e: consensus_api::ConsensusError| CliError {
        kind: ExitKind::Other,
        message: format!(
            "{}: {e} (read with the {} backend; another one may have written it: --backend)",
            dir.display(),
            backend.name()
        ),
    };
    let identity = data_dir::read_identity(dir).map_err(failed)?;
    let r = backend.inspect(dir, entries).map_err(failed)?;
    Ok(json!({
        "data_dir": dir.display().to_string(),
        "identity": identity.map(|i| json!({
            "cluster_id": i.cluster_id,
            "node_id": i.node_id,
            "incarnation": i.incarnation.to_string(),
            "created_unix_ms": i.created_unix_ms,
        })),
        "report": serde_json::to_value(&r).map_err(|e| e.to_string())?,
    }))
}

/// The text form of a [`report`].
pub fn render(v: &Value, output: Output) -> Result<String, CliError> {
    if output == Output::Json {
        return serde_json::to_string_pretty(v).map_err(|e| CliError::from(e.to_string()));
    }
    let r = &v["report"];
    let num = |x: &Value| x.as_u64().map_or("-".to_string(), |n| n.to_string());
    let mut out = vec![format!(
        "data dir     {}",
        v["data_dir"].as_str().unwrap_or("?")
    )];
    out.push(match &v["identity"] {
        Value::Null => {
            "identity     none (written before identity records, or not a data dir)".into()
        }
        i => format!(
            "identity     cluster {}, node {}, incarnation {}, created {} (unix ms)",
            i["cluster_id"].as_str().unwrap_or("?"),
            num(&i["node_id"]),
            i["incarnation"].as_str().unwrap_or("?"),
            num(&i["created_unix_ms"])
        ),
    });
    out.push(format!(
        "backend      {}",
        r["backend"].as_str().unwrap_or("?")
    ));
    out.push(format!(
        "hard state   term {}, vote {}, commit {}",
        num(&r["term"]),
        num(&r["vote"]),
        num(&r["commit_index"])
    ));
    out.push(format!(
        "membership   voters {}; learners {}",
        ids(&r["voters"]),
        ids(&r["learners"])
    ));
    let bounds = match r["log_bounds"].as_array() {
        Some(b) if b.len() == 2 => format!("entries {}..={}", num(&b[0]), num(&b[1])),
        _ => "no entries".into(),
    };
    let purged = match r["purged"].as_array() {
        Some(p) if p.len() == 2 => {
            format!("; compacted through {} (term {})", num(&p[0]), num(&p[1]))
        }
        _ => String::new(),
    };
    out.push(format!("log          {bounds}{purged}"));
    out.push(match &r["snapshot"] {
        Value::Null => "snapshot     none".into(),
        s => {
            format!(
                "snapshot     index {}, term {}, {} bytes of state; voters {}; learners {}",
                num(&s["index"]),
                num(&s["term"]),
                num(&s["data_bytes"]),
                ids(&s["voters"]),
                ids(&s["learners"])
            )
        }
    });
    for n in r["notes"].as_array().into_iter().flatten() {
        out.push(format!("note         {}", n.as_str().unwrap_or("?")));
    }
    let rows = r["entries"].as_array().cloned().unwrap_or_default();
    if !rows.is_empty() {
        out.push(String::new());
        out.push(format!(
            "{:>10}  {:>6}  {:<10}  {:>8}  DETAIL",
            "INDEX", "TERM", "KIND", "BYTES"
        ));
        for e in rows {
            out.push(format!(
                "{:>10}  {:>6}  {:<10}  {:>8}  {}",
                num(&e["index"]),
                num(&e["term"]),
                e["kind"].as_str().unwrap_or("?"),
                num(&e["bytes"]),
                e["detail"].as_str().unwrap_or("")
            ));
        }
    }
    Ok(out.join("\n"))
}

/// `broker debug force-voters`: checks the data dir belongs to node `id`, runs the backend's
/// forced recovery, and appends what it did to the data dir's `RECOVERY.log`.
pub fn force_voters(
    backend: &dyn Backend,
    dir: &Path,
    id: u64,
    voters: &std::collections::BTreeSet<u64>,
) -> Result<(), CliError> {
    let failed = |kind, e: String| CliError {
        kind,
        message: format!("{}: {e}", dir.display()),
    };
    if let Some(identity) =
        data_dir::read_identity(dir).map_err(|e| failed(ExitKind::Other, e.to_string()))?
    {
        if identity.node_id != id {
            return Err(failed(
                ExitKind::Invalid,
                format!(
                    "this data dir belongs to node {}, not {id}",
                    identity.node_id
                ),
            ));
        }
    }
    eprintln!(
        "WARNING: forcing the voters of node {id} to {voters:?}: unsafe, for a permanent loss \
         of quorum only"
    );
    let done = backend.force_voters(dir, id, voters).map_err(|e| {
        let kind = match e.kind() {
            consensus_api::ErrorKind::InvalidRequest => ExitKind::Invalid,
            _ => ExitKind::Other,
        };
        failed(kind, e.to_string())
    })?;
    let at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let record = format!("{at} unix ms: node {id}: {done}\n");
    use std::io::Write as _;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("RECOVERY.log"))
        .and_then(|mut f| f.write_all(record.as_bytes()).and_then(|()| f.sync_all()))
        .map_err(|e| failed(ExitKind::Other, format!("writing RECOVERY.log: {e}")))?;
    println!("{done}");
    println!("recorded in {}", dir.join("RECOVERY.log").display());
    Ok(())
}

/// `broker restore`: checks the backup whole, then writes node `id`'s data dir of the new
/// cluster `cluster_id` with voters `peers` from it
/// ([`restore_data_dir`](consensus_api::backup::restore_data_dir)).
pub fn restore(
    backend: &dyn Backend,
    backup: &Path,
    dir: &Path,
    cluster_id: &str,
    id: u64,
    peers: &std::collections::BTreeMap<u64, String>,
) -> Result<(), CliError> {
    let failed = |e: consensus_api::ConsensusError| CliError {
        kind: match e.kind() {
            consensus_api::ErrorKind::InvalidRequest => ExitKind::Invalid,
            _ => ExitKind::Other,
        },
        message: e.to_string(),
    };
    let b = consensus_api::backup::Backup::open(backup).map_err(failed)?;
    let info = b.info();
    println!(
        "backup of cluster {} at index {} (taken on node {} at {} unix ms): {} bytes of image, \
         checksum ok",
        info.header.cluster_id,
        info.header.index,
        info.header.node_id,
        info.header.created_unix_ms,
        info.image_bytes
    );
    let done = consensus_api::backup::restore_data_dir(backend, &b, dir, cluster_id, id, peers)
        .map_err(failed)?;
    println!(
        "{}: node {id} of cluster {cluster_id}: {done}",
        dir.display()
    );
    println!(
        "start it with: broker serve --id {id} --data-dir {} --cluster-id {cluster_id} --peers {} \
         ... (no --bootstrap)",
        dir.display(),
        peers
            .iter()
            .map(|(i, a)| format!("{i}={a}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    Ok(())
}
