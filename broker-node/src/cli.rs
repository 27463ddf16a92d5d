//! The admin CLI: `broker topics ...`, `broker brokers ...`, `broker cluster ...`.
//!
//! Requests go through [`crate::http`] (names percent-encoded into one path segment each, and
//! checked against the server's rules before anything is sent), to the first of the `--admin`
//! endpoints that answers. Output is a table for people, or `--output json` for scripts (64-bit
//! numbers above 2^53 become strings, so `jq` cannot round them). Exit codes tell failures
//! apart: see [`ExitKind`].

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use broker::{check_topic_name, BrokerId, BrokerRegistration, Topic};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::Value;

use crate::http;

/// What kind of failure ended a command, and its exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    /// 1: anything else (a malformed answer, an internal error).
    Other = 1,
    /// 2: bad command line (clap also exits 2).
    Usage = 2,
    /// 3: no such topic or broker.
    NotFound = 3,
    /// 4: already exists, stale epoch, or the broker is alive.
    Conflict = 4,
    /// 5: the request is invalid (bad name, config, count, body too large).
    Invalid = 5,
    /// 6: no node answered, no leader, or timed out: retry later or elsewhere.
    Unavailable = 6,
    /// 7: no credential or a wrong one.
    Unauthorized = 7,
}

/// A failed command: what to print, and how to exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliError {
    /// The exit code's meaning.
    pub kind: ExitKind,
    /// What went wrong, for stderr.
    pub message: String,
}

impl CliError {
    fn new(kind: ExitKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

impl From<String> for CliError {
    fn from(message: String) -> Self {
        Self::new(ExitKind::Other, message)
    }
}

/// Output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    #[default]
    Table,
    /// JSON for scripts (numbers above 2^53 as strings).
    Json,
}

/// Where and how the admin commands connect.
#[derive(Args, Debug, Clone)]
pub struct Conn {
    /// Admin endpoints of any nodes, tried in turn, comma-separated: `host:port` or
    /// `https://host:port` (HTTPS, checked with --admin-ca), or `http://host:port` for a node
    /// started with --admin-insecure-plaintext.
    #[arg(
        long,
        env = "BROKER_ADMIN",
        value_delimiter = ',',
        default_value = "127.0.0.1:9093",
        global = true
    )]
    pub admin: Vec<String>,
    /// The CA certificate (PEM) that signed the nodes' admin certificates: the cluster CA.
    #[arg(long, env = "BROKER_ADMIN_CA", global = true)]
    pub admin_ca: Option<PathBuf>,
    /// A client certificate (PEM) from the cluster CA, a credential instead of the token.
    #[arg(long, env = "BROKER_ADMIN_CERT", global = true, requires = "admin_key")]
    pub admin_cert: Option<PathBuf>,
    /// The key (PEM) of --admin-cert.
    #[arg(long, env = "BROKER_ADMIN_KEY", global = true, requires = "admin_cert")]
    pub admin_key: Option<PathBuf>,
    /// Seconds one request may take, per endpoint.
    #[arg(long, default_value_t = 10.0, global = true, env = "BROKER_TIMEOUT")]
    pub timeout: f64,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Output::Table, global = true)]
    pub output: Output,
}

/// `broker topics ...`.
#[derive(Subcommand, Debug)]
pub enum TopicsCmd {
    /// List topic names (with --describe: partitions, replication, configs).
    #[command(
        after_help = "Examples:\n  broker topics list\n  broker topics list --describe -o json"
    )]
    List {
        /// One line per topic with its counts, instead of names.
        #[arg(long)]
        describe: bool,
    },
    /// Describe one topic: configs and every partition's leader, ISR and replicas.
    #[command(after_help = "Example:\n  broker topics describe orders")]
    Describe {
        /// Topic name.
        name: String,
    },
    /// Create a topic.
    #[command(
        after_help = "Examples:\n  broker topics create orders --partitions 6 --replication-factor 3\n  \
                            broker topics create audit --partitions 1 --replication-factor 3 \
                            --config retention.ms=-1 --if-not-exists\n\n\
                            Known configs: broker topics configs"
    )]
    Create {
        /// Topic name: 1-249 characters of [a-zA-Z0-9._-].
        name: String,
        /// Partitions (1-10000).
        #[arg(long)]
        partitions: u32,
        /// Replicas per partition (at most the available brokers).
        #[arg(long)]
        replication_factor: u16,
        /// A config `key=value` (repeatable; `broker topics configs` lists the keys).
        #[arg(long = "config", value_parser = parse_kv)]
        configs: Vec<(String, String)>,
        /// Succeed (exit 0) when the topic already exists.
        #[arg(long)]
        if_not_exists: bool,
    },
    /// Delete a topic.
    #[command(after_help = "Example:\n  broker topics delete orders --if-exists")]
    Delete {
        /// Topic name.
        name: String,
        /// Succeed (exit 0) when there is no such topic.
        #[arg(long)]
        if_exists: bool,
    },
    /// Set or remove configs of a topic.
    #[command(
        name = "alter-configs",
        after_help = "Example:\n  broker topics alter-configs orders --set retention.ms=86400000 \
                      --remove cleanup.policy"
    )]
    AlterConfigs {
        /// Topic name.
        name: String,
        /// A config to set, `key=value` (repeatable).
        #[arg(long = "set", value_parser = parse_kv)]
        set: Vec<(String, String)>,
        /// A config to remove (repeatable).
        #[arg(long = "remove")]
        remove: Vec<String>,
    },
    /// Grow a topic to more partitions (partitions are never removed).
    #[command(
        name = "add-partitions",
        after_help = "Example:\n  broker topics add-partitions orders --total 12"
    )]
    AddPartitions {
        /// Topic name.
        name: String,
        /// The new partition count.
        #[arg(long)]
        total: u32,
    },
    /// The known topic configs, their values and defaults.
    Configs,
    /// Preferred-leader election: move each partition's leadership back to its first replica
    /// where that one is in sync and available (Kafka's `kafka-leader-election
    /// --election-type preferred`), for the named topics or every topic.
    #[command(
        name = "elect-leaders",
        after_help = "Examples:\n  broker topics elect-leaders            # every topic\n  \
                      broker topics elect-leaders orders payments"
    )]
    ElectLeaders {
        /// Topics (none: every topic).
        names: Vec<String>,
    },
}

/// `broker brokers ...`.
#[derive(Subcommand, Debug)]
pub enum BrokersCmd {
    /// List registered brokers.
    List,
    /// Describe one broker.
    Describe {
        /// Broker id.
        id: BrokerId,
    },
    /// Cancel a broker's controlled shutdown: it is available again (leads, joins ISRs).
    #[command(name = "cancel-shutdown")]
    CancelShutdown {
        /// Broker id.
        id: BrokerId,
    },
    /// Unregister a dead (fenced) or shutting-down broker, giving up its replicas' places.
    #[command(after_help = "Example:\n  broker brokers unregister 4")]
    Unregister {
        /// Broker id.
        id: BrokerId,
    },
}

/// `broker quorum ...`.
#[derive(Subcommand, Debug)]
pub enum QuorumCmd {
    /// The quorum as its leader sees it, like `kafka-metadata-quorum describe`.
    #[command(
        after_help = "Examples:\n  broker quorum describe --status\n  broker quorum describe --replication -o json"
    )]
    Describe {
        /// Leader, term, commit index, largest follower lag, voters and learners.
        #[arg(
            long,
            conflicts_with = "replication",
            required_unless_present = "replication"
        )]
        status: bool,
        /// One row per member: matched index, lag, last contact, last caught up, role.
        #[arg(long)]
        replication: bool,
    },
}

/// `broker cluster ...`.
#[derive(Subcommand, Debug)]
pub enum ClusterCmd {
    /// Consensus status of the first node that answers.
    Status,
    /// Add a node (started with `serve --join`) as a learner: it receives the log.
    #[command(
        name = "add-learner",
        after_help = "Example:\n  broker cluster add-learner 4 --address 10.0.0.4:7001"
    )]
    AddLearner {
        /// Node id.
        id: u64,
        /// Its consensus transport address (host:port).
        #[arg(long)]
        address: String,
    },
    /// Add a node as a voter: add it as a learner, wait until it has caught up with the
    /// leader, then promote it.
    #[command(
        name = "add-voter",
        after_help = "Example:\n  broker cluster add-voter 4 --address 10.0.0.4:7001 --wait 120"
    )]
    AddVoter {
        /// Node id.
        id: u64,
        /// Its consensus transport address (host:port).
        #[arg(long)]
        address: String,
        /// Seconds to wait for it to catch up before giving up (it stays a learner).
        #[arg(long, default_value_t = 60.0)]
        wait: f64,
    },
    /// Replace a voter: add the new node as a voter (as `add-voter`), then remove the old one.
    #[command(
        after_help = "Example (node 1 lost its disk; node 5 takes its place):\n  broker cluster replace 1 5 --address 10.0.0.5:7001"
    )]
    Replace {
        /// The voter to replace.
        old: u64,
        /// The new node's id (started with `serve --join`).
        new: u64,
        /// The new node's consensus transport address (host:port).
        #[arg(long)]
        address: String,
        /// Seconds to wait for the new node to catch up.
        #[arg(long, default_value_t = 60.0)]
        wait: f64,
    },
    /// Make a learner a voter (the voting set becomes the current one plus it). Refused while
    /// the learner has not caught up with the leader.
    Promote {
        /// Node id.
        id: u64,
    },
    /// Remove a member (a voter leaves the voting set first); never the last voter.
    Remove {
        /// Node id.
        id: u64,
    },
    /// Save a backup of the metadata image to FILE (taken after a read barrier: every write
    /// acknowledged before it is in it), checked (length, checksum) before it is given its
    /// name. Restore a new cluster from it with `broker restore`.
    #[command(
        after_help = "Example:\n  broker cluster backup /backups/metadata-2026-12-03.backup"
    )]
    Backup {
        /// Where to write it; an existing file is refused.
        file: std::path::PathBuf,
    },
    /// Move the consensus leadership to a voter.
    #[command(name = "transfer-leader")]
    TransferLeader {
        /// Node id.
        id: u64,
    },
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} must be KEY=VALUE"))
}

/// The admin API as the CLI uses it.
pub struct Client {
    endpoints: Vec<String>,
    token: Option<String>,
    tls: http::ClientTls,
    timeout: Duration,
    /// How results are printed.
    pub output: Output,
}

/// An answer with its status and parsed body.
struct Answer {
    status: u16,
    body: Value,
}

impl Client {
    /// A client for `conn`, sending `token` (if any) with every request.
    pub fn new(conn: &Conn, token: Option<String>) -> Result<Self, CliError> {
        let usage = |m: String| CliError::new(ExitKind::Usage, m);
        if !(conn.timeout.is_finite() && conn.timeout > 0.0 && conn.timeout <= 3600.0) {
            return Err(usage(format!(
                "--timeout {} must be a number of seconds above 0 and at most 3600",
                conn.timeout
            )));
        }
        let endpoints: Vec<String> = conn
            .admin
            .iter()
            .map(|a| a.trim().to_string())
            .filter(|a| !a.is_empty())
            .collect();
        if endpoints.is_empty() {
            return Err(usage("--admin needs at least one endpoint".into()));
        }
        for e in &endpoints {
            http::endpoint(e).map_err(usage)?;
        }
        let tls = http::ClientTls {
            ca: conn.admin_ca.clone(),
            identity: conn.admin_cert.clone().zip(conn.admin_key.clone()),
        };
        Ok(Self {
            endpoints,
            token,
            tls,
            timeout: Duration::from_secs_f64(conn.timeout),
            output: conn.output,
        })
    }

    /// One request, to each endpoint in turn until one answers with something other than
    /// "unavailable".
    async fn call(
        &self,
        method: &str,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&Value>,
    ) -> Result<Answer, CliError> {
        let json = body.map(Value::to_string);
        let mut last = None;
        for addr in &self.endpoints {
            let mut req = http::Request::new(addr, method, path)
                .tls(Some(&self.tls))
                .json(json.as_deref())
                .token(self.token.as_deref());
            for (k, v) in query {
                req = req.query(k, v);
            }
            match req.send_bytes(self.timeout).await {
                Ok((status, bytes)) => {
                    let body = if bytes.is_empty() {
                        Value::Null
                    } else {
                        serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                            Value::String(String::from_utf8_lossy(&bytes).into_owned())
                        })
                    };
                    let answer = Answer { status, body };
                    // Another node may have a leader, or be up: try it.
                    if status == 503 && self.endpoints.len() > 1 {
                        last = Some(error_of(&answer));
                        continue;
                    }
                    return Ok(answer);
                }
                Err(http::SendError::Request(m)) => return Err(CliError::new(ExitKind::Usage, m)),
                Err(http::SendError::Unreachable(m)) => {
                    last = Some(CliError::new(ExitKind::Unavailable, m));
                }
            }
        }
        Err(last.unwrap_or_else(|| CliError::new(ExitKind::Unavailable, "no endpoint")))
    }

    /// A call whose 2xx answer is returned and anything else is an error.
    async fn ok(
        &self,
        method: &str,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&Value>,
    ) -> Result<Value, CliError> {
        let a = self.call(method, path, query, body).await?;
        if (200..300).contains(&a.status) {
            Ok(a.body)
        } else {
            Err(error_of(&a))
        }
    }

    fn print_json(&self, v: &Value) -> Result<(), CliError> {
        let text = serde_json::to_string_pretty(&safe_numbers(v.clone()))
            .map_err(|e| format!("cannot render JSON: {e}"))?;
        emit(&text)
    }

    fn typed<T: serde::de::DeserializeOwned>(v: Value, what: &str) -> Result<T, CliError> {
        serde_json::from_value(v)
            .map_err(|e| format!("unexpected {what} from the node: {e}").into())
    }

    /// Runs `broker topics ...`.
    pub async fn topics(&self, cmd: TopicsCmd) -> Result<(), CliError> {
        match cmd {
            TopicsCmd::List { describe } => {
                let view = if describe { "summary" } else { "names" };
                let v = self.ok("GET", "/topics", &[("view", view)], None).await?;
                if self.output == Output::Json {
                    return self.print_json(&v);
                }
                if !describe {
                    let names: Vec<String> = Self::typed(v, "topic list")?;
                    return emit(&names.join("\n"));
                }
                let rows = v.as_array().cloned().unwrap_or_default();
                let mut t = Table::new(&[
                    "TOPIC",
                    "ID",
                    "PARTITIONS",
                    "RF",
                    "OFFLINE",
                    "UNDER-REPLICATED",
                    "CONFIGS",
                ]);
                for r in rows {
                    t.row(vec![
                        text(&r["name"]),
                        text(&r["id"]),
                        text(&r["partitions"]),
                        text(&r["replication_factor"]),
                        text(&r["offline_partitions"]),
                        text(&r["under_replicated_partitions"]),
                        configs_text(&r["configs"]),
                    ]);
                }
                emit(&t.render())
            }
            TopicsCmd::Describe { name } => {
                checked(&name)?;
                let v = self
                    .ok("GET", &segments(&["topics", &name])?, &[], None)
                    .await?;
                if self.output == Output::Json {
                    return self.print_json(&v);
                }
                let topic: Topic = Self::typed(v, "topic")?;
                emit(&describe_topic(&topic))
            }
            TopicsCmd::Create {
                name,
                partitions,
                replication_factor,
                configs,
                if_not_exists,
            } => {
                checked(&name)?;
                for (k, v) in &configs {
                    broker::configs::check(k, v)
                        .map_err(|e| CliError::new(ExitKind::Invalid, e.to_string()))?;
                }
                let body = serde_json::json!({
                    "name": name,
                    "partitions": partitions,
                    "replication_factor": replication_factor,
                    "configs": configs.into_iter().collect::<BTreeMap<_, _>>(),
                });
                let a = self.call("POST", "/topics", &[], Some(&body)).await?;
                if a.status == 409 && if_not_exists {
                    return self.done(&format!("topic {name} already exists"), &a.body);
                }
                if !(200..300).contains(&a.status) {
                    return Err(error_of(&a));
                }
                let id = text(&a.body["topic_id"]);
                self.done(
                    &format!(
                        "created topic {name} (id {id}): {partitions} partitions, replication \
                         factor {replication_factor}"
                    ),
                    &a.body,
                )
            }
            TopicsCmd::Delete { name, if_exists } => {
                checked(&name)?;
                let a = self
                    .call("DELETE", &segments(&["topics", &name])?, &[], None)
                    .await?;
                if a.status == 404 && if_exists {
                    return self.done(&format!("no topic {name}"), &Value::Null);
                }
                if !(200..300).contains(&a.status) {
                    return Err(error_of(&a));
                }
                self.done(&format!("deleted topic {name}"), &Value::Null)
            }
            TopicsCmd::AlterConfigs { name, set, remove } => {
                checked(&name)?;
                if set.is_empty() && remove.is_empty() {
                    return Err(CliError::new(
                        ExitKind::Usage,
                        "nothing to change: give --set KEY=VALUE or --remove KEY",
                    ));
                }
                for (k, v) in &set {
                    broker::configs::check(k, v)
                        .map_err(|e| CliError::new(ExitKind::Invalid, e.to_string()))?;
                }
                let body = serde_json::json!({
                    "set": set.into_iter().collect::<BTreeMap<_, _>>(),
                    "remove": remove,
                });
                self.ok(
                    "POST",
                    &segments(&["topics", &name, "configs"])?,
                    &[],
                    Some(&body),
                )
                .await?;
                self.done(
                    &format!("altered the configs of topic {name}"),
                    &Value::Null,
                )
            }
            TopicsCmd::AddPartitions { name, total } => {
                checked(&name)?;
                let body = serde_json::json!({ "total": total });
                self.ok(
                    "POST",
                    &segments(&["topics", &name, "partitions"])?,
                    &[],
                    Some(&body),
                )
                .await?;
                self.done(
                    &format!("topic {name} now has {total} partitions"),
                    &Value::Null,
                )
            }
            TopicsCmd::ElectLeaders { names } => {
                names.iter().try_for_each(|n| checked(n))?;
                let body = serde_json::json!({ "topics": names });
                let v = self
                    .ok("POST", "/elections/preferred", &[], Some(&body))
                    .await?;
                let moved = text(&v["moved"]);
                self.done(
                    &format!(
                        "moved the leadership of {moved} partition(s) to their preferred replica"
                    ),
                    &v,
                )
            }
            TopicsCmd::Configs => {
                let v = self.ok("GET", "/topic-configs", &[], None).await?;
                if self.output == Output::Json {
                    return self.print_json(&v);
                }
                let mut t = Table::new(&["CONFIG", "VALUES", "DEFAULT", "WHAT"]);
                for c in v.as_array().cloned().unwrap_or_default() {
                    let values = match c["type"].as_str() {
                        Some("boolean") => "true|false".to_string(),
                        Some("long") => format!("{}..{}", text(&c["min"]), text(&c["max"])),
                        Some("list_of") => format!("list of {}", words(&c["values"])),
                        _ => words(&c["values"]),
                    };
                    t.row(vec![
                        text(&c["name"]),
                        values,
                        text(&c["default"]),
                        text(&c["doc"]),
                    ]);
                }
                emit(&t.render())
            }
        }
    }

    /// Runs `broker brokers ...`.
    pub async fn brokers(&self, cmd: BrokersCmd) -> Result<(), CliError> {
        match cmd {
            BrokersCmd::List => {
                let v = self.ok("GET", "/brokers", &[], None).await?;
                if self.output == Output::Json {
                    return self.print_json(&v);
                }
                let brokers: Vec<BrokerRegistration> = Self::typed(v, "broker list")?;
                emit(&broker_table(&brokers))
            }
            BrokersCmd::Describe { id } => {
                let v = self
                    .ok("GET", &segments(&["brokers", &id.to_string()])?, &[], None)
                    .await?;
                if self.output == Output::Json {
                    return self.print_json(&v);
                }
                let b: BrokerRegistration = Self::typed(v, "broker")?;
                emit(&broker_table(&[b]))
            }
            BrokersCmd::CancelShutdown { id } => {
                self.ok(
                    "POST",
                    &segments(&["brokers", &id.to_string(), "cancel-shutdown"])?,
                    &[],
                    None,
                )
                .await?;
                self.done(
                    &format!("broker {id} is no longer shutting down"),
                    &Value::Null,
                )
            }
            BrokersCmd::Unregister { id } => {
                self.ok(
                    "DELETE",
                    &segments(&["brokers", &id.to_string()])?,
                    &[],
                    None,
                )
                .await?;
                self.done(&format!("unregistered broker {id}"), &Value::Null)
            }
        }
    }

    /// Runs `broker cluster ...`.
    pub async fn cluster(&self, cmd: ClusterCmd) -> Result<(), CliError> {
        match cmd {
            ClusterCmd::Status => {
                let v = self.ok("GET", "/cluster/status", &[], None).await?;
                if self.output == Output::Json {
                    return self.print_json(&v);
                }
                let mut t = Table::new(&["FIELD", "VALUE"]);
                for k in [
                    "id",
                    "role",
                    "term",
                    "leader",
                    "commit_index",
                    "applied_index",
                    "last_log_index",
                    "snapshot_index",
                    "voters",
                    "learners",
                    "stopped",
                ] {
                    t.row(vec![k.to_string(), text(&v[k])]);
                }
                emit(&t.render())
            }
            ClusterCmd::AddLearner { id, address } => {
                let body = serde_json::json!({ "id": id, "address": address });
                self.ok("POST", "/cluster/learners", &[], Some(&body))
                    .await?;
                self.done(
                    &format!(
                        "node {id} ({address}) added as a learner; it catches up in the \
                         background (broker quorum describe --replication)"
                    ),
                    &Value::Null,
                )
            }
            ClusterCmd::AddVoter { id, address, wait } => {
                self.add_voter(id, &address, wait).await?;
                self.done(
                    &format!("node {id} ({address}) caught up and is a voter"),
                    &Value::Null,
                )
            }
            ClusterCmd::Replace {
                old,
                new,
                address,
                wait,
            } => {
                if old == new {
                    return Err(CliError::new(
                        ExitKind::Invalid,
                        "the new node must have another id than the one it replaces",
                    ));
                }
                let st = self.ok("GET", "/cluster/status", &[], None).await?;
                if !node_ids(&st["voters"]).contains(&old) {
                    return Err(CliError::new(
                        ExitKind::NotFound,
                        format!("node {old} is not a voter"),
                    ));
                }
                self.add_voter(new, &address, wait).await?;
                self.ok(
                    "DELETE",
                    &segments(&["cluster", "members", &old.to_string()])?,
                    &[],
                    None,
                )
                .await?;
                self.done(
                    &format!("node {new} ({address}) replaced node {old}"),
                    &Value::Null,
                )
            }
            ClusterCmd::Promote { id } => {
                let st = self.ok("GET", "/cluster/status", &[], None).await?;
                let mut voters = node_ids(&st["voters"]);
                let learners = node_ids(&st["learners"]);
                if voters.contains(&id) {
                    return Err(CliError::new(
                        ExitKind::Conflict,
                        format!("node {id} is already a voter"),
                    ));
                }
                if !learners.contains(&id) {
                    return Err(CliError::new(
                        ExitKind::NotFound,
                        format!("node {id} is not a learner: add it first (cluster add-learner)"),
                    ));
                }
                voters.push(id);
                let body = serde_json::json!({ "voters": voters });
                self.ok("PUT", "/cluster/voters", &[], Some(&body)).await?;
                self.done(&format!("node {id} is a voter"), &Value::Null)
            }
            ClusterCmd::Remove { id } => {
                self.ok(
                    "DELETE",
                    &segments(&["cluster", "members", &id.to_string()])?,
                    &[],
                    None,
                )
                .await?;
                self.done(&format!("node {id} removed"), &Value::Null)
            }
            ClusterCmd::Backup { file } => self.backup(&file).await,
            ClusterCmd::TransferLeader { id } => {
                let body = serde_json::json!({ "id": id });
                self.ok("POST", "/cluster/leader", &[], Some(&body)).await?;
                self.done(&format!("leadership moved to node {id}"), &Value::Null)
            }
        }
    }

    /// `broker cluster backup FILE`: downloads the backup into `FILE.partial` from the first
    /// node that serves it, checks it whole, then renames it to `FILE`.
    async fn backup(&self, file: &Path) -> Result<(), CliError> {
        let other = |m: String| CliError::new(ExitKind::Other, m);
        if file.exists() {
            return Err(CliError::new(
                ExitKind::Usage,
                format!(
                    "{} exists: a backup never overwrites a file",
                    file.display()
                ),
            ));
        }
        let mut name = file.file_name().unwrap_or_default().to_os_string();
        name.push(".partial");
        let partial = file.with_file_name(name);
        let mut last = None;
        for addr in &self.endpoints {
            let mut out = std::fs::File::create(&partial)
                .map_err(|e| other(format!("create {}: {e}", partial.display())))?;
            let sent = http::Request::new(addr, "GET", broker::admin::BACKUP_PATH)
                .tls(Some(&self.tls))
                .token(self.token.as_deref())
                .send_into(self.timeout, &mut out)
                .await;
            let synced = out.sync_all();
            drop(out);
            let status = match sent {
                Ok(status) => status,
                Err(e) => {
                    let _ = std::fs::remove_file(&partial);
                    match e {
                        http::SendError::Request(m) => {
                            return Err(CliError::new(ExitKind::Usage, m))
                        }
                        http::SendError::Unreachable(m) => {
                            last = Some(CliError::new(ExitKind::Unavailable, m));
                            continue;
                        }
                    }
                }
            };
            if status != 200 {
                let bytes = std::fs::read(&partial).unwrap_or_default();
                let _ = std::fs::remove_file(&partial);
                let body = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                    Value::String(String::from_utf8_lossy(&bytes).into_owned())
                });
                let answer = Answer { status, body };
                if status == 503 && self.endpoints.len() > 1 {
                    last = Some(error_of(&answer));
                    continue;
                }
                return Err(error_of(&answer));
            }
            let checked = synced
                .map_err(|e| other(format!("fsync {}: {e}", partial.display())))
                .and_then(|()| {
                    consensus_api::backup::Backup::open(&partial).map_err(|e| {
                        other(format!("the node's answer is not a complete backup: {e}"))
                    })
                });
            let backup = match checked {
                Ok(b) => b,
                Err(e) => {
                    let _ = std::fs::remove_file(&partial);
                    return Err(e);
                }
            };
            std::fs::rename(&partial, file)
                .map_err(|e| other(format!("rename to {}: {e}", file.display())))?;
            let dir = match file.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| other(format!("fsync {}: {e}", dir.display())))?;
            let info = backup.info();
            let h = &info.header;
            let summary = format!(
                "backup of cluster {} at index {} (taken on node {}): {} bytes of image, \
                 crc32 {:08x}, saved to {}",
                h.cluster_id,
                h.index,
                h.node_id,
                info.image_bytes,
                info.crc32,
                file.display()
            );
            let mut body = serde_json::to_value(info).map_err(|e| other(e.to_string()))?;
            if let Some(o) = body.as_object_mut() {
                o.insert("file".into(), Value::String(file.display().to_string()));
            }
            return self.done(&summary, &body);
        }
        Err(last.unwrap_or_else(|| CliError::new(ExitKind::Unavailable, "no endpoint")))
    }

    /// Adds `id` as a learner (unless it is one already), waits up to `wait` seconds for the
    /// leader to see it caught up, then promotes it.
    async fn add_voter(&self, id: u64, address: &str, wait: f64) -> Result<(), CliError> {
        let st = self.ok("GET", "/cluster/status", &[], None).await?;
        if node_ids(&st["voters"]).contains(&id) {
            return Err(CliError::new(
                ExitKind::Conflict,
                format!("node {id} is already a voter"),
            ));
        }
        if !node_ids(&st["learners"]).contains(&id) {
            let body = serde_json::json!({ "id": id, "address": address });
            self.ok("POST", "/cluster/learners", &[], Some(&body))
                .await?;
        }
        let wait = Duration::try_from_secs_f64(wait)
            .map_err(|e| CliError::new(ExitKind::Usage, format!("--wait: {e}")))?;
        let deadline = std::time::Instant::now() + wait;
        loop {
            let q = self.ok("GET", "/cluster/quorum", &[], None).await?;
            let row = q["replication"]
                .as_array()
                .and_then(|rows| rows.iter().find(|r| r["id"].as_u64() == Some(id)));
            let caught_up = row.is_some_and(|r| r["last_caught_up_ms_ago"].as_u64() == Some(0));
            if caught_up {
                break;
            }
            if std::time::Instant::now() >= deadline {
                let lag = row.map(|r| text(&r["lag"])).unwrap_or_else(|| "-".into());
                return Err(CliError::new(
                    ExitKind::Unavailable,
                    format!(
                        "node {id} has not caught up in {wait:?} (lag {lag} entries); it stays a \
                         learner: check that it runs and is reachable at {address}, then \
                         `broker cluster promote {id}`"
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let mut voters = node_ids(&st["voters"]);
        voters.push(id);
        let body = serde_json::json!({ "voters": voters });
        self.ok("PUT", "/cluster/voters", &[], Some(&body)).await?;
        Ok(())
    }

    /// Runs `broker quorum ...`.
    pub async fn quorum(&self, cmd: QuorumCmd) -> Result<(), CliError> {
        let QuorumCmd::Describe { replication, .. } = cmd;
        let q = self.ok("GET", "/cluster/quorum", &[], None).await?;
        if self.output == Output::Json {
            return self.print_json(&q);
        }
        if replication {
            let mut t = Table::new(&[
                "NODE",
                "ROLE",
                "MATCHED",
                "LAG",
                "LAST_CONTACT_MS_AGO",
                "LAST_CAUGHT_UP_MS_AGO",
            ]);
            for r in q["replication"].as_array().into_iter().flatten() {
                t.row(
                    [
                        "id",
                        "role",
                        "matched",
                        "lag",
                        "last_contact_ms_ago",
                        "last_caught_up_ms_ago",
                    ]
                    .iter()
                    .map(|k| text(&r[*k]))
                    .collect(),
                );
            }
            return emit(&t.render());
        }
        let members = |k: &str| -> String {
            q[k].as_array()
                .into_iter()
                .flatten()
                .map(|m| format!("{}@{}", text(&m["id"]), text(&m["address"])))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut t = Table::new(&["FIELD", "VALUE"]);
        for (label, v) in [
            ("ClusterId", text(&q["cluster_id"])),
            ("LeaderId", text(&q["leader"])),
            ("Term", text(&q["term"])),
            ("CommitIndex", text(&q["commit_index"])),
            ("LastLogIndex", text(&q["last_log_index"])),
            ("MaxFollowerLag", text(&q["max_follower_lag"])),
            ("MaxFollowerLagTimeMs", text(&q["max_follower_lag_ms"])),
            ("CurrentVoters", members("voters")),
            ("CurrentObservers", members("learners")),
        ] {
            t.row(vec![label.to_string(), v]);
        }
        emit(&t.render())
    }

    /// A finished change: a one-line summary, or `{"ok": true, ...}` in JSON.
    fn done(&self, summary: &str, body: &Value) -> Result<(), CliError> {
        match self.output {
            Output::Table => emit(summary),
            Output::Json => {
                let mut v = serde_json::json!({ "ok": true, "summary": summary });
                if let (Some(obj), Some(extra)) = (v.as_object_mut(), body.as_object()) {
                    for (k, x) in extra {
                        obj.insert(k.clone(), x.clone());
                    }
                }
                self.print_json(&v)
            }
        }
    }
}

/// The node ids of a status list (`voters`, `learners`).
fn node_ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default()
}

/// A request path of `parts`, each one encoded segment.
fn segments(parts: &[&str]) -> Result<String, CliError> {
    http::path(parts).map_err(|m| CliError::new(ExitKind::Invalid, m))
}

/// A topic name the server would refuse is refused here, before anything is sent.
fn checked(name: &str) -> Result<(), CliError> {
    check_topic_name(name).map_err(|e| CliError::new(ExitKind::Invalid, e.to_string()))
}

/// The error of a non-2xx answer, with the exit kind its status means.
fn error_of(a: &Answer) -> CliError {
    let kind = match a.status {
        404 => ExitKind::NotFound,
        409 => ExitKind::Conflict,
        400 | 405 | 410 | 413 | 422 => ExitKind::Invalid,
        401 | 403 => ExitKind::Unauthorized,
        502..=504 => ExitKind::Unavailable,
        _ => ExitKind::Other,
    };
    let reason = a.body["reason"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| text(&a.body));
    let error = a.body["error"].as_str().unwrap_or("error");
    let leader = match &a.body["leader"] {
        Value::Null => String::new(),
        l => format!(" (leader: node {})", text(l)),
    };
    CliError::new(kind, format!("HTTP {} {error}: {reason}{leader}", a.status))
}

/// JSON numbers above 2^53 as strings: JavaScript-based tools (`jq`) would round them.
fn safe_numbers(v: Value) -> Value {
    const MAX_SAFE: u64 = (1 << 53) - 1;
    match v {
        Value::Number(n) if n.as_u64().is_some_and(|u| u > MAX_SAFE) => {
            Value::String(n.to_string())
        }
        Value::Array(a) => Value::Array(a.into_iter().map(safe_numbers).collect()),
        Value::Object(o) => {
            Value::Object(o.into_iter().map(|(k, x)| (k, safe_numbers(x))).collect())
        }
        other => other,
    }
}

/// A value for a table cell.
fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(text).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

fn words(v: &Value) -> String {
    v.as_array()
        .map(|a| a.iter().map(text).collect::<Vec<_>>().join("|"))
        .unwrap_or_default()
}

fn configs_text(v: &Value) -> String {
    match v.as_object() {
        Some(o) if !o.is_empty() => o
            .iter()
            .map(|(k, x)| format!("{k}={}", text(x)))
            .collect::<Vec<_>>()
            .join(","),
        _ => "-".into(),
    }
}

fn ids(v: &[BrokerId]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    v.iter()
        .map(BrokerId::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn describe_topic(t: &Topic) -> String {
    let configs = if t.configs.is_empty() {
        "-".to_string()
    } else {
        t.configs
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut out = format!(
        "Topic: {}\tId: {}\tPartitions: {}\tConfigs: {configs}\n",
        t.name,
        t.id,
        t.partitions.len()
    );
    let mut table = Table::new(&["PARTITION", "LEADER", "LEADER-EPOCH", "ISR", "REPLICAS"]);
    for (i, p) in t.partitions.iter().enumerate() {
        table.row(vec![
            i.to_string(),
            p.leader.map_or("none".into(), |l| l.to_string()),
            p.leader_epoch.to_string(),
            ids(&p.isr),
            ids(&p.replicas),
        ]);
    }
    out.push_str(&table.render());
    out
}

fn broker_table(brokers: &[BrokerRegistration]) -> String {
    let mut t = Table::new(&[
        "BROKER",
        "STATE",
        "EPOCH",
        "INCARNATION",
        "RACK",
        "ENDPOINTS",
        "LAST-HEARTBEAT",
    ]);
    for b in brokers {
        let state = if b.shutting_down {
            "shutting-down"
        } else if b.fenced {
            "fenced"
        } else {
            "active"
        };
        t.row(vec![
            b.broker_id.to_string(),
            state.into(),
            b.epoch.to_string(),
            b.incarnation.to_string(),
            b.rack.clone().unwrap_or_else(|| "-".into()),
            if b.endpoints.is_empty() {
                "-".into()
            } else {
                b.endpoints.join(",")
            },
            b.last_heartbeat_offset.to_string(),
        ]);
    }
    t.render()
}

/// Left-aligned columns separated by two spaces.
struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(header: &[&str]) -> Self {
        Self {
            rows: vec![header.iter().map(|h| h.to_string()).collect()],
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn render(&self) -> String {
        let cols = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..cols)
            .map(|c| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(c))
                    .map(|s| s.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for r in &self.rows {
            let mut line = String::new();
            for (c, cell) in r.iter().enumerate() {
                if c + 1 == r.len() {
                    line.push_str(cell);
                } else {
                    let pad = widths[c].saturating_sub(cell.chars().count());
                    line.push_str(cell);
                    line.push_str(&" ".repeat(pad + 2));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out.pop();
        out
    }
}

/// Prints `text` and a newline; a closed pipe (`| head`) ends the command quietly.
fn emit(text: &str) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    let written = if text.is_empty() {
        Ok(())
    } else {
        writeln!(out, "{text}")
    }
    .and_then(|()| out.flush());
    match written {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(format!("writing the output: {e}").into()),
    }
}

/// The admin token from `file`, else from `BROKER_ADMIN_TOKEN`; `None` when neither is set.
pub fn admin_token(file: Option<&Path>) -> Result<Option<String>, CliError> {
    if let Some(f) = file {
        let text = std::fs::read_to_string(f).map_err(|e| {
            CliError::new(
                ExitKind::Usage,
                format!("admin token file {}: {e}", f.display()),
            )
        })?;
        return Ok(Some(text.trim().to_string()));
    }
    Ok(std::env::var("BROKER_ADMIN_TOKEN")
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn big_numbers_become_strings_and_small_ones_stay() {
        let v = serde_json::json!({"incarnation": u64::MAX, "epoch": 7, "list": [1u64 << 60]});
        let s = safe_numbers(v);
        assert_eq!(s["incarnation"], Value::String(u64::MAX.to_string()));
        assert_eq!(s["epoch"], serde_json::json!(7));
        assert_eq!(s["list"][0], Value::String((1u64 << 60).to_string()));
    }

    #[test]
    fn tables_align_their_columns() {
        let mut t = Table::new(&["A", "LONG-HEADER", "C"]);
        t.row(vec!["wide-cell".into(), "x".into(), "y".into()]);
        assert_eq!(
            t.render(),
            "A          LONG-HEADER  C\nwide-cell  x            y"
        );
    }

    #[test]
    fn statuses_map_to_distinct_exit_codes() {
        let of = |status| {
            error_of(&Answer {
                status,
                body: serde_json::json!({"error": "e", "reason": "r"}),
            })
            .kind as i32
        };
        assert_eq!(
            [of(404), of(409), of(400), of(503), of(401), of(500)],
            [3, 4, 5, 6, 7, 1]
        );
    }
}
