//! Development certificates: a throwaway cluster CA and per-node certificates, generated once per
//! directory, for tests and local clusters. Never use them in production: the CA key sits next to
//! the certificates.
//!
//! Layout of a directory: `ca.pem` + `ca.key` (the CA), `node-{id}.pem` + `node-{id}.key`
//! per node (DNS names [`node_name`]`(id)` and `localhost`, IP addresses 127.0.0.1 and ::1,
//! serverAuth and clientAuth usages: the local names let an admin client dial a node's HTTPS
//! API at 127.0.0.1 and check its certificate), and, made by [`ensure_operator`],
//! `operator.pem` + `operator.key` (DNS name [`OPERATOR_NAME`], clientAuth only: an admin
//! client's certificate, which no transport accepts as a node's).
//!
//! Several nodes (threads of one process or separate processes) may call [`ensure`] on the same
//! directory at once. Every file is published atomically and only if absent: written to a private
//! temporary file, synced, then hard-linked to its final name, which fails if another caller got
//! there first (the loser then uses the winner's file). Keys are published before the
//! certificates made from them, and a certificate is always made from the key as published, so
//! a certificate never outlives or mismatches its key; [`ensure`] still checks the whole set and
//! says how to recover when a directory was tampered with.

use std::fs;
use std::io::{self, Write};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use consensus_api::NodeId;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

use crate::{node_name, verify_peer_id};

/// File name of the development CA certificate.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the development CA private key.
pub const CA_KEY_FILE: &str = "ca.key";
/// Common name of the development CA; it must stay constant, since node certificates signed
/// later name their issuer by it.
const CA_COMMON_NAME: &str = "consensus development CA";

/// The name in the development operator certificate ([`ensure_operator`]).
pub const OPERATOR_NAME: &str = "operator";

/// Where [`ensure`] put a node's material; the three paths of a `TlsConfig::Files`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevPaths {
    /// The development CA certificate.
    pub ca_cert: PathBuf,
    /// The node's certificate, signed by the CA.
    pub node_cert: PathBuf,
    /// The node's private key (mode 0600 on unix).
    pub node_key: PathBuf,
}

/// Makes sure `dir` holds a development CA and node `id`'s certificate and key, creating what is
/// missing; returns their paths. Safe to call concurrently from several nodes on one directory.
pub fn ensure(dir: &Path, id: NodeId) -> Result<DevPaths, String> {
    let (ca_cert, ca_key_path, ca_key) = ensure_ca(dir)?;
    let (node_cert, node_key) = ensure_leaf(dir, &node_name(id), &ca_key, node_params(id)?)?;
    let paths = DevPaths {
        ca_cert,
        node_cert,
        node_key,
    };
    check(&paths, id, &ca_key_path).map_err(|e| {
        format!(
            "the dev certificates in {} are inconsistent ({e}); delete the directory to \
             regenerate them",
            dir.display()
        )
    })?;
    Ok(paths)
}

/// Makes sure `dir` holds the development CA and an operator's client certificate and key
/// (`operator.pem`, `operator.key`: DNS name [`OPERATOR_NAME`], clientAuth only), the
/// credential an admin client presents to a node's HTTPS admin API; returns the CA
/// certificate, the operator certificate and key paths. Safe to call concurrently.
pub fn ensure_operator(dir: &Path) -> Result<DevPaths, String> {
    let (ca_cert, _, ca_key) = ensure_ca(dir)?;
    let (node_cert, node_key) = ensure_leaf(dir, OPERATOR_NAME, &ca_key, operator_params()?)?;
    Ok(DevPaths {
        ca_cert,
        node_cert,
        node_key,
    })
}

/// The CA of `dir` (created if absent): its certificate path, key path and key.
fn ensure_ca(dir: &Path) -> Result<(PathBuf, PathBuf, KeyPair), String> {
    fs::create_dir_all(dir).map_err(|e| {
        format!(
            "cannot create the dev certificate directory {}: {e}",
            dir.display()
        )
    })?;
    let ca_key_path = dir.join(CA_KEY_FILE);
    publish_if_absent(&ca_key_path, true, new_key_pem)?;
    let ca_key = read_key_pair(&ca_key_path)?;
    let ca_cert = dir.join(CA_CERT_FILE);
    publish_if_absent(&ca_cert, false, || {
        ca_params()?
            .self_signed(&ca_key)
            .map(|c| c.pem())
            .map_err(|e| format!("cannot self-sign the dev CA: {e}"))
    })?;
    Ok((ca_cert, ca_key_path, ca_key))
}

/// `name.pem` and `name.key` in `dir` (created if absent, signed by `ca_key`): their paths.
fn ensure_leaf(
    dir: &Path,
    name: &str,
    ca_key: &KeyPair,
    params: CertificateParams,
) -> Result<(PathBuf, PathBuf), String> {
    let key = dir.join(format!("{name}.key"));
    publish_if_absent(&key, true, new_key_pem)?;
    let key_pair = read_key_pair(&key)?;
    let cert = dir.join(format!("{name}.pem"));
    publish_if_absent(&cert, false, || {
        let issuer = Issuer::new(ca_params()?, ca_key);
        params
            .signed_by(&key_pair, &issuer)
            .map(|c| c.pem())
            .map_err(|e| format!("cannot sign the certificate of {name}: {e}"))
    })?;
    Ok((cert, key))
}

/// Generates (once) the development CA and the certificates of `ids` in `dir`.
pub fn generate_dev_certs(dir: &Path, ids: &[NodeId]) -> Result<Vec<DevPaths>, String> {
    ids.iter().map(|&id| ensure(dir, id)).collect()
}

fn ca_params() -> Result<CertificateParams, String> {
    let mut params = CertificateParams::new(Vec::<String>::new())
        .map_err(|e| format!("dev CA parameters: {e}"))?;
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, CA_COMMON_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

fn node_params(id: NodeId) -> Result<CertificateParams, String> {
    let name = node_name(id);
    let mut params = CertificateParams::new(vec![name.clone(), "localhost".into()])
        .map_err(|e| format!("{name:?} is not a valid subject alternative name: {e}"))?;
    for ip in [Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()] {
        params.subject_alt_names.push(SanType::IpAddress(ip));
    }
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    Ok(params)
}

fn operator_params() -> Result<CertificateParams, String> {
    let mut params = CertificateParams::new(vec![OPERATOR_NAME.to_string()])
        .map_err(|e| format!("operator certificate parameters: {e}"))?;
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, OPERATOR_NAME);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    Ok(params)
}

fn new_key_pem() -> Result<String, String> {
    KeyPair::generate()
        .map(|k| k.serialize_pem())
        .map_err(|e| format!("cannot generate a key pair: {e}"))
}

fn read_key_pair(path: &Path) -> Result<KeyPair, String> {
    let pem =
        fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    KeyPair::from_pem(&pem).map_err(|e| format!("cannot parse the key {}: {e}", path.display()))
}

/// Publishes `make()`'s output at `path` unless a file is already there; never overwrites.
fn publish_if_absent(
    path: &Path,
    secret: bool,
    make: impl FnOnce() -> Result<String, String>,
) -> Result<(), String> {
    if path.exists() {
        return Ok(());
    }
    let contents = make()?;
    let tmp = temp_path(path);
    let published = write_new(&tmp, contents.as_bytes(), secret).and_then(|()| {
        match fs::hard_link(&tmp, path) {
            Ok(()) => Ok(()),
            // Another node published first; its file is as good as ours.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(format!("cannot publish {}: {e}", path.display())),
        }
    });
    let _ = fs::remove_file(&tmp);
    published
}

/// A name in the same directory no other caller (thread or process) uses.
fn temp_path(path: &Path) -> PathBuf {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.{seq}.tmp", std::process::id()))
}

fn write_new(path: &Path, bytes: &[u8], secret: bool) -> Result<(), String> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    if secret {
        owner_only(&mut options);
    }
    let mut file = options
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(unix)]
fn owner_only(options: &mut fs::OpenOptions) {
    use std::os::unix::fs::OpenOptionsExt;
    options.mode(0o600);
}

#[cfg(not(unix))]
fn owner_only(_: &mut fs::OpenOptions) {}

/// Checks the set fits together: the CA key matches the CA certificate, the node certificate
/// chains to the CA, names node `id`, and matches the node key.
fn check(paths: &DevPaths, id: NodeId, ca_key: &Path) -> Result<(), String> {
    let provider = rustls::crypto::ring::default_provider();
    let ca = CertificateDer::from_pem_file(&paths.ca_cert)
        .map_err(|e| format!("{}: {e}", paths.ca_cert.display()))?;
    let node = CertificateDer::from_pem_file(&paths.node_cert)
        .map_err(|e| format!("{}: {e}", paths.node_cert.display()))?;
    let key_of = |path: &Path| {
        PrivateKeyDer::from_pem_file(path).map_err(|e| format!("{}: {e}", path.display()))
    };
    rustls::sign::CertifiedKey::from_der(vec![ca.clone()], key_of(ca_key)?, &provider)
        .map_err(|e| format!("{CA_KEY_FILE} does not match {CA_CERT_FILE}: {e}"))?;
    rustls::sign::CertifiedKey::from_der(
        vec![node.clone()],
        key_of(paths.node_key.as_path())?,
        &provider,
    )
    .map_err(|e| {
        format!(
            "the key of {} does not match its certificate: {e}",
            node_name(id)
        )
    })?;
    let anchors = [webpki::anchor_from_trusted_cert(&ca)
        .map_err(|e| format!("{CA_CERT_FILE} is not a usable CA: {e}"))?];
    let ee = webpki::EndEntityCert::try_from(&node)
        .map_err(|e| format!("cannot parse the certificate of {}: {e}", node_name(id)))?;
    ee.verify_for_usage(
        provider.signature_verification_algorithms.all,
        &anchors,
        &[],
        UnixTime::now(),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map(|_| ())
    .map_err(|e| {
        format!(
            "the certificate of {} is not signed by the CA: {e}",
            node_name(id)
        )
    })?;
    verify_peer_id(&node, id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_certs_generated_twice_reuse_the_ca_and_the_node_material() {
        let dir = tempfile::tempdir().expect("temp dir");
        let first = ensure(dir.path(), 1).expect("first");
        let ca = fs::read(&first.ca_cert).expect("ca");
        let cert = fs::read(&first.node_cert).expect("cert");
        let second = ensure(dir.path(), 2).expect("second node");
        assert_eq!(second.ca_cert, first.ca_cert);
        let again = ensure(dir.path(), 1).expect("again");
        assert_eq!(again, first);
        assert_eq!(fs::read(&again.ca_cert).expect("ca"), ca, "CA regenerated");
        assert_eq!(
            fs::read(&again.node_cert).expect("cert"),
            cert,
            "cert regenerated"
        );
    }

    #[test]
    fn concurrent_ensure_on_one_dir_yields_one_ca() {
        let dir = tempfile::tempdir().expect("temp dir");
        let cas: Vec<Vec<u8>> = std::thread::scope(|s| {
            // Two threads race on node 1's files too, not only on the CA.
            let handles: Vec<_> = [1u64, 1, 2, 3]
                .into_iter()
                .map(|id| {
                    let dir = dir.path();
                    s.spawn(move || {
                        let paths = ensure(dir, id).expect("ensure");
                        fs::read(paths.ca_cert).expect("read ca")
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("thread"))
                .collect()
        });
        assert!(
            cas.windows(2).all(|w| w[0] == w[1]),
            "several CAs were kept"
        );
        // Every node certificate checks out against the one CA (ensure re-checks the set).
        for id in 1..=3 {
            ensure(dir.path(), id).expect("consistent");
        }
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .expect("list")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    }

    #[test]
    fn a_node_certificate_from_a_replaced_ca_is_reported() {
        let dir = tempfile::tempdir().expect("temp dir");
        ensure(dir.path(), 1).expect("first");
        fs::remove_file(dir.path().join(CA_CERT_FILE)).expect("rm");
        fs::remove_file(dir.path().join(CA_KEY_FILE)).expect("rm");
        let err = ensure(dir.path(), 1).expect_err("stale node certificate");
        assert!(err.contains("delete the directory"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn private_keys_are_readable_by_the_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("temp dir");
        let paths = ensure(dir.path(), 1).expect("ensure");
        for key in [paths.node_key, dir.path().join(CA_KEY_FILE)] {
            let mode = fs::metadata(&key).expect("stat").permissions().mode();
            assert_eq!(mode & 0o077, 0, "{} has mode {mode:o}", key.display());
        }
    }
}
