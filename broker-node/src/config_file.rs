//! `broker serve --config FILE`: every flag of `serve` (and the global ones) may come from a
//! TOML file, and a flag given on the command line overrides the file.
//!
//! The file's top-level keys are flag names without the dashes (`data-dir` or `data_dir`);
//! values are strings, integers, booleans (`true` gives the flag, `false` leaves it out) and,
//! for `peers`, a table of node id to `host:port`:
//!
//! ```toml
//! id = 1
//! listen = "10.0.0.1:7001"
//! admin = "10.0.0.1:9093"
//! data-dir = "/var/lib/broker"
//! cluster-id = "prod-metadata"
//! tls-ca = "/etc/broker/ca.pem"
//! tls-cert = "/etc/broker/node-1.pem"
//! tls-key = "/etc/broker/node-1.key"
//! admin-token-file = "/etc/broker/admin-token"
//!
//! [peers]
//! 1 = "10.0.0.1:7001"
//! 2 = "10.0.0.2:7001"
//! 3 = "10.0.0.3:7001"
//! ```
//!
//! The file is turned into flags before the command line is parsed, so it is checked by the
//! same rules: an unknown key, a value of the wrong type or a bad value is refused with the
//! file's name and the key.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::Path;

/// Expands `--config FILE` (or `--config=FILE`) after the `serve` subcommand in `args` (the
/// whole command line, program name first) into the flags the file sets, leaving out those the
/// command line gives itself. `flags` are the long flag names `serve` accepts. Command lines
/// without `serve --config` come back unchanged.
pub fn expand(args: Vec<OsString>, flags: &BTreeSet<String>) -> Result<Vec<OsString>, String> {
    let Some(serve) = args.iter().position(|a| a == "serve") else {
        return Ok(args);
    };
    let mut path = None;
    let mut rest = Vec::with_capacity(args.len());
    let mut it = args.into_iter().enumerate();
    while let Some((i, a)) = it.next() {
        let text = a.to_string_lossy().into_owned();
        if i > serve && text == "--config" {
            let Some((_, p)) = it.next() else {
                return Err("--config needs a file".into());
            };
            path = Some(p);
            continue;
        }
        if let Some(p) = text.strip_prefix("--config=").filter(|_| i > serve) {
            path = Some(OsString::from(p));
            continue;
        }
        rest.push(a);
    }
    let Some(path) = path else {
        return Ok(rest);
    };
    let path = Path::new(&path);
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the config file {}: {e}", path.display()))?;
    let given: BTreeSet<String> = rest
        .iter()
        .skip(serve + 1)
        .filter_map(|a| a.to_str())
        .filter_map(|a| a.strip_prefix("--"))
        .map(|a| a.split('=').next().unwrap_or(a).to_string())
        .collect();
    let from_file =
        flags_of(&text, flags).map_err(|e| format!("config file {}: {e}", path.display()))?;
    for (flag, value) in from_file {
        if given.contains(&flag) {
            continue;
        }
        rest.push(OsString::from(format!("--{flag}")));
        rest.extend(value.map(OsString::from));
    }
    Ok(rest)
}

/// The flags a config file's text sets: each `(name, value)`, a boolean flag without value.
fn flags_of(text: &str, flags: &BTreeSet<String>) -> Result<Vec<(String, Option<String>)>, String> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| e.to_string())?;
    let mut out = Vec::new();
    for (key, value) in table {
        let flag = key.replace('_', "-");
        if flag == "config" || !flags.contains(&flag) {
            return Err(format!("unknown key {key:?}: not a flag of `broker serve`"));
        }
        let scalar = |v: &toml::Value| -> Result<String, String> {
            match v {
                toml::Value::String(s) => Ok(s.clone()),
                toml::Value::Integer(i) => Ok(i.to_string()),
                toml::Value::Float(f) => Ok(f.to_string()),
                other => Err(format!(
                    "{key:?} must be a string or a number, not {}",
                    other.type_str()
                )),
            }
        };
        let value = match &value {
            toml::Value::Boolean(true) => None,
            toml::Value::Boolean(false) => continue,
            toml::Value::Table(t) if flag == "peers" => {
                let pairs: Result<Vec<String>, String> = t
                    .iter()
                    .map(|(id, addr)| Ok(format!("{id}={}", scalar(addr)?)))
                    .collect();
                Some(pairs?.join(","))
            }
            v => Some(scalar(v)?),
        };
        out.push((flag, value));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags() -> BTreeSet<String> {
        [
            "id",
            "listen",
            "peers",
            "data-dir",
            "join",
            "insecure-plaintext",
            "heartbeat-ms",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    fn run(file: &str, cli: &[&str]) -> Result<Vec<String>, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let path = dir.path().join("node.toml");
        std::fs::write(&path, file).map_err(|e| e.to_string())?;
        let mut args: Vec<OsString> = ["broker", "serve"].iter().map(OsString::from).collect();
        args.push("--config".into());
        args.push(path.clone().into());
        args.extend(cli.iter().map(OsString::from));
        expand(args, &flags()).map(|a| {
            a.into_iter()
                .map(|s| s.to_string_lossy().into_owned())
                .collect()
        })
    }

    #[test]
    fn the_file_gives_flags_and_the_command_line_overrides_them() {
        let file = "id = 1\nlisten = \"127.0.0.1:7001\"\ndata_dir = \"/d\"\nheartbeat-ms = 500\n\
                    join = false\ninsecure-plaintext = true\n[peers]\n1 = \"a:1\"\n2 = \"b:1\"\n";
        let args = run(file, &["--id", "7"]).expect("expanded");
        let line = args.join(" ");
        assert!(line.starts_with("broker serve --id 7 "), "{line}");
        assert!(!line.contains("--id 1"), "the command line wins: {line}");
        for part in [
            "--listen 127.0.0.1:7001",
            "--data-dir /d",
            "--heartbeat-ms 500",
            "--peers 1=a:1,2=b:1",
        ] {
            assert!(line.contains(part), "{part}: {line}");
        }
        assert!(line.contains("--insecure-plaintext"), "{line}");
        assert!(
            !line.contains("--join"),
            "false leaves the flag out: {line}"
        );
        assert!(!line.contains("--config"), "{line}");
    }

    #[test]
    fn unknown_keys_wrong_types_and_bad_toml_are_refused_with_the_file_named() {
        for (file, want) in [
            ("idd = 1\n", "unknown key \"idd\""),
            ("config = \"x\"\n", "unknown key \"config\""),
            ("listen = [1, 2]\n", "must be a string or a number"),
            ("id = \n", "config file"),
        ] {
            let err = run(file, &[]).expect_err(file);
            assert!(
                err.contains(want) && err.contains("node.toml"),
                "{file}: {err}"
            );
        }
        let err = run("id = 1\n", &["--config"]).expect_err("a second --config without file");
        assert!(err.contains("--config needs a file"), "{err}");
    }

    #[test]
    fn other_command_lines_are_left_alone() {
        let args: Vec<OsString> = ["broker", "topics", "list", "--config", "x"]
            .iter()
            .map(OsString::from)
            .collect();
        assert_eq!(expand(args.clone(), &flags()), Ok(args));
    }
}
