//! # consensus-tls: mutual TLS material for consensus transports
//!
//! Every node holds one certificate, signed by the cluster CA, whose DNS subject alternative name
//! is [`node_name`]`(id)` (`node-7`) and which carries both the serverAuth and clientAuth usages.
//! That one certificate does both jobs:
//! - **as a server**: a client dialing node `p` uses `node_name(p)` as the TLS server name, so a
//!   stale or wrong address never silently reaches another node;
//! - **as a client**: the server requires a certificate chained to the cluster CA, and once the
//!   client announces its node id, checks with [`verify_peer_id`] that the certificate names
//!   exactly that id. A node cannot impersonate another one, even inside the cluster.
//!
//! [`load`] turns a [`TlsConfig`] into [`TlsMaterial`] (PEM files, or generated development
//! certificates, see [`dev`]); [`server_config`] and [`client_config`] build rustls
//! configurations with the *ring* provider, TLS 1.3 only, client certificates mandatory and no
//! session resumption (every connection presents its certificate, so the peer's identity is
//! always at hand).
//!
//! The crate is transport-neutral: QUIC uses it today, the gRPC transport can adopt it unchanged.

#![warn(missing_docs, unreachable_pub)]

pub mod dev;

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use consensus_api::{NodeId, TlsConfig};
use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

pub use dev::{generate_dev_certs, DevPaths};

/// The DNS name every certificate of node `id` carries, and the TLS server name a client expects
/// when it dials that node.
pub fn node_name(id: NodeId) -> String {
    format!("node-{id}")
}

/// One node's TLS identity and the cluster CA that vouches for every peer.
pub struct TlsMaterial {
    /// The cluster CA certificate: the only trust anchor, for servers and clients alike.
    pub ca: CertificateDer<'static>,
    /// This node's certificate chain, end-entity certificate first.
    pub chain: Vec<CertificateDer<'static>>,
    /// This node's private key.
    pub key: PrivateKeyDer<'static>,
}

impl Clone for TlsMaterial {
    fn clone(&self) -> Self {
        Self {
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("ca", &format_args!("{} bytes", self.ca.len()))
            .field(
                "chain",
                &format_args!("{} certificate(s)", self.chain.len()),
            )
            .field("key", &"[redacted]")
            .finish()
    }
}

/// Loads node `id`'s TLS material as `tls` describes it.
///
/// `Files` reads the three PEM files; `DevCerts` first generates (once per directory) a
/// development CA and this node's certificate, see [`dev::ensure`]; `Unset` and
/// `InsecurePlaintext` are errors that say what to configure, since a caller of this function
/// needs TLS. Errors name the offending file.
pub fn load(tls: &TlsConfig, id: NodeId) -> Result<TlsMaterial, String> {
    match tls {
        TlsConfig::Unset => Err(
            "no TLS configured: this transport always uses mutual TLS; set transport.tls to \
             TlsConfig::Files { ca_cert, node_cert, node_key } (cluster CA, node certificate \
             and key) or TlsConfig::DevCerts { dir } for development"
                .into(),
        ),
        TlsConfig::InsecurePlaintext => Err(
            "TlsConfig::InsecurePlaintext: this transport always uses mutual TLS; configure \
             TlsConfig::Files (cluster CA, node certificate and key) or TlsConfig::DevCerts"
                .into(),
        ),
        TlsConfig::Files {
            ca_cert,
            node_cert,
            node_key,
        } => load_files(ca_cert, node_cert, node_key),
        TlsConfig::DevCerts { dir } => {
            let paths = dev::ensure(dir, id)?;
            load_files(&paths.ca_cert, &paths.node_cert, &paths.node_key)
        }
        other => Err(format!("unsupported TLS setting {other:?}")),
    }
}

/// The three PEM files of node `id` as `tls` names them: `Files` as given, `DevCerts` generated
/// (once per directory, see [`dev::ensure`]). `Unset` and `InsecurePlaintext` are errors that
/// say what to configure: a caller that allows plaintext decides that before asking.
pub fn paths(tls: &TlsConfig, id: NodeId) -> Result<DevPaths, String> {
    match tls {
        TlsConfig::Files {
            ca_cert,
            node_cert,
            node_key,
        } => Ok(DevPaths {
            ca_cert: ca_cert.clone(),
            node_cert: node_cert.clone(),
            node_key: node_key.clone(),
        }),
        TlsConfig::DevCerts { dir } => dev::ensure(dir, id),
        TlsConfig::Unset => Err(
            "no TLS configured: set TlsConfig::Files { ca_cert, node_cert, node_key } (cluster              CA, node certificate and key) or TlsConfig::DevCerts { dir } for development"
                .into(),
        ),
        other => Err(format!("{other:?} names no certificates; mutual TLS needs them")),
    }
}

/// PEM bytes of a CA certificate, a certificate chain and its key, for libraries that take PEM
/// (tonic).
#[derive(Clone)]
pub struct PemBytes {
    /// The CA certificate.
    pub ca: Vec<u8>,
    /// The certificate chain.
    pub cert: Vec<u8>,
    /// The private key.
    pub key: Vec<u8>,
}

impl fmt::Debug for PemBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PemBytes")
            .field("ca", &format_args!("{} bytes", self.ca.len()))
            .field("cert", &format_args!("{} bytes", self.cert.len()))
            .field("key", &"[redacted]")
            .finish()
    }
}

/// Reads the files of `paths` as PEM bytes, after checking them with [`load_files`] (so a bad
/// file fails here, with its path and what is wrong, not later in a handshake).
pub fn read_pem(paths: &DevPaths) -> Result<PemBytes, String> {
    load_files(&paths.ca_cert, &paths.node_cert, &paths.node_key)?;
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    Ok(PemBytes {
        ca: read(&paths.ca_cert)?,
        cert: read(&paths.node_cert)?,
        key: read(&paths.node_key)?,
    })
}

/// Reads the cluster CA (exactly one certificate), the node's chain and its private key from PEM
/// files.
pub fn load_files(
    ca_cert: &Path,
    node_cert: &Path,
    node_key: &Path,
) -> Result<TlsMaterial, String> {
    let [ca] =
        <[CertificateDer<'static>; 1]>::try_from(read_certs(ca_cert, "CA certificate file")?)
            .map_err(|cas| {
                format!(
                    "CA certificate file {} holds {} certificates; expected exactly the cluster CA",
                    ca_cert.display(),
                    cas.len()
                )
            })?;
    let chain = read_certs(node_cert, "node certificate file")?;
    let key = PrivateKeyDer::from_pem_file(node_key)
        .map_err(|e| pem_error("node key file", node_key, e, "private key"))?;
    Ok(TlsMaterial { ca, chain, key })
}

fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(what, path, e, "CERTIFICATE section"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(what, path, e, "CERTIFICATE section"))?;
    if certs.is_empty() {
        return Err(pem_error(
            what,
            path,
            pem::Error::NoItemsFound,
            "CERTIFICATE section",
        ));
    }
    Ok(certs)
}

fn pem_error(what: &str, path: &Path, e: pem::Error, wanted: &str) -> String {
    match e {
        pem::Error::Io(io) => format!("cannot read {what} {}: {io}", path.display()),
        pem::Error::NoItemsFound => {
            format!("{what} {} holds no PEM {wanted}", path.display())
        }
        other => format!("{what} {} is not valid PEM: {other}", path.display()),
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(m: &TlsMaterial) -> Result<Arc<RootCertStore>, String> {
    let mut roots = RootCertStore::empty();
    roots
        .add(m.ca.clone())
        .map_err(|e| format!("the cluster CA certificate is not a usable trust anchor: {e}"))?;
    Ok(Arc::new(roots))
}

fn alpn_list(alpn: &[u8]) -> Vec<Vec<u8>> {
    if alpn.is_empty() {
        Vec::new()
    } else {
        vec![alpn.to_vec()]
    }
}

/// A rustls server configuration: presents this node's chain, requires a client certificate
/// signed by the cluster CA, TLS 1.3 only, offers `alpn` (none when empty).
///
/// The client certificate is only chain-checked here; which node it names is checked later with
/// [`verify_peer_id`], once the peer has said which node it claims to be.
pub fn server_config(m: &TlsMaterial, alpn: &[u8]) -> Result<ServerConfig, String> {
    tls13_server(m, alpn, true)
}

/// A TLS 1.3 server presenting `m`'s chain, checking client certificates against the cluster
/// CA (`required`: a handshake without one fails; otherwise it is only asked for), without
/// session tickets: every handshake carries the client's certificate.
fn tls13_server(m: &TlsMaterial, alpn: &[u8], required: bool) -> Result<ServerConfig, String> {
    let provider = provider();
    let builder = WebPkiClientVerifier::builder_with_provider(roots(m)?, provider.clone());
    let builder = if required {
        builder
    } else {
        builder.allow_unauthenticated()
    };
    let verifier = builder
        .build()
        .map_err(|e| format!("client certificate verifier: {e}"))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("TLS 1.3 with the ring provider: {e}"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(m.chain.clone(), m.key.clone_key())
        .map_err(|e| format!("the certificate and key are not a usable pair: {e}"))?;
    config.alpn_protocols = alpn_list(alpn);
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// A rustls client configuration: trusts the cluster CA only, authenticates with this node's
/// chain, TLS 1.3 only, offers `alpn` (none when empty). Dial node `p` with server name
/// [`node_name`]`(p)`.
pub fn client_config(m: &TlsMaterial, alpn: &[u8]) -> Result<ClientConfig, String> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("TLS 1.3 with the ring provider: {e}"))?
        .with_root_certificates(roots(m)?)
        .with_client_auth_cert(m.chain.clone(), m.key.clone_key())
        .map_err(|e| format!("the node certificate and key are not a usable pair: {e}"))?;
    config.alpn_protocols = alpn_list(alpn);
    config.resumption = Resumption::disabled();
    Ok(config)
}

/// The ALPN protocol of the admin API's HTTPS.
pub const HTTP1_ALPN: &[u8] = b"http/1.1";

/// A rustls server configuration for a node's HTTPS admin API: presents `m`'s chain (whose
/// names are what admin clients check), TLS 1.3 only, ALPN `http/1.1`, and *asks* for a client
/// certificate: one chained to the cluster CA is verified in the handshake (a certificate from
/// another CA ends it), none at all is allowed, so the API can take a bearer token instead.
/// Whether one was presented is `ServerConnection::peer_certificates`.
pub fn admin_server_config(m: &TlsMaterial) -> Result<ServerConfig, String> {
    tls13_server(m, HTTP1_ALPN, false)
}

/// A rustls client configuration for an admin client: trusts exactly the CA certificate in the
/// PEM file `ca_cert` and checks the server's name as usual; presents the certificate chain and
/// key of `identity` (PEM files) when given. TLS 1.3 only, ALPN `http/1.1`.
pub fn admin_client_config(
    ca_cert: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<ClientConfig, String> {
    let mut store = RootCertStore::empty();
    for ca in read_certs(ca_cert, "CA certificate file")? {
        store.add(ca).map_err(|e| {
            format!(
                "CA certificate file {}: not a usable trust anchor: {e}",
                ca_cert.display()
            )
        })?;
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("TLS 1.3 with the ring provider: {e}"))?
        .with_root_certificates(store);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = read_certs(cert, "client certificate file")?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| pem_error("client key file", key, e, "private key"))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("the client certificate and key are not a usable pair: {e}"))?
        }
    };
    config.alpn_protocols = alpn_list(HTTP1_ALPN);
    Ok(config)
}

/// Checks that `cert` (already verified against the cluster CA by the TLS handshake) names node
/// `id`, i.e. is valid for the DNS name [`node_name`]`(id)`.
pub fn verify_peer_id(cert: &CertificateDer<'_>, id: NodeId) -> Result<(), String> {
    let name = node_name(id);
    let server_name = ServerName::try_from(name.as_str())
        .map_err(|e| format!("{name:?} is not a valid DNS name: {e}"))?;
    let ee = webpki::EndEntityCert::try_from(cert)
        .map_err(|e| format!("cannot parse the peer certificate: {e}"))?;
    ee.verify_is_valid_for_subject_name(&server_name)
        .map_err(|e| format!("the peer certificate does not name {name}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::{ClientConnection, ServerConnection};
    use std::path::PathBuf;

    const ALPN: &[u8] = b"test/1";

    fn dev(dir: &Path, id: NodeId) -> TlsMaterial {
        load(
            &TlsConfig::DevCerts {
                dir: dir.to_path_buf(),
            },
            id,
        )
        .expect("dev material")
    }

    /// Runs an in-memory TLS handshake; `Err` carries whichever side's error ended it.
    fn handshake(client: ClientConfig, server: ServerConfig, name: &str) -> Result<(), String> {
        let name = ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?;
        let mut c = ClientConnection::new(Arc::new(client), name).map_err(|e| e.to_string())?;
        let mut s = ServerConnection::new(Arc::new(server)).map_err(|e| e.to_string())?;
        for _ in 0..16 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).map_err(|e| e.to_string())?;
            }
            let mut rd = buf.as_slice();
            while !rd.is_empty() {
                s.read_tls(&mut rd).map_err(|e| e.to_string())?;
                s.process_new_packets()
                    .map_err(|e| format!("server: {e}"))?;
            }
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).map_err(|e| e.to_string())?;
            }
            let mut rd = buf.as_slice();
            while !rd.is_empty() {
                c.read_tls(&mut rd).map_err(|e| e.to_string())?;
                c.process_new_packets()
                    .map_err(|e| format!("client: {e}"))?;
            }
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(());
            }
        }
        Err("handshake did not finish".into())
    }

    #[test]
    fn node_name_is_the_dns_name_of_the_node() {
        assert_eq!(node_name(7), "node-7");
    }

    #[test]
    fn verify_peer_id_accepts_its_own_id_and_rejects_another() {
        let dir = tempfile::tempdir().expect("temp dir");
        let m = dev(dir.path(), 3);
        verify_peer_id(&m.chain[0], 3).expect("own id");
        let err = verify_peer_id(&m.chain[0], 4).expect_err("another id");
        assert!(err.contains("node-4"), "{err}");
        let err = verify_peer_id(&CertificateDer::from(vec![1u8, 2, 3]), 3).expect_err("garbage");
        assert!(err.contains("parse"), "{err}");
    }

    #[test]
    fn mutual_tls_accepts_cluster_members_under_the_dialed_name() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (a, b) = (dev(dir.path(), 1), dev(dir.path(), 2));
        let client = client_config(&a, ALPN).expect("client config");
        let server = server_config(&b, ALPN).expect("server config");
        handshake(client, server, &node_name(2)).expect("handshake");
    }

    #[test]
    fn a_client_dialing_the_wrong_node_name_rejects_the_server() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (a, b) = (dev(dir.path(), 1), dev(dir.path(), 2));
        let client = client_config(&a, ALPN).expect("client config");
        let server = server_config(&b, ALPN).expect("server config");
        let err = handshake(client, server, &node_name(3)).expect_err("wrong node");
        assert!(err.starts_with("client"), "{err}");
    }

    #[test]
    fn a_peer_of_another_ca_is_refused_on_either_side() {
        let (d1, d2) = (
            tempfile::tempdir().expect("temp dir"),
            tempfile::tempdir().expect("temp dir"),
        );
        let stranger = dev(d1.path(), 1);
        let member = dev(d2.path(), 2);
        // The stranger trusts our CA, so only the server's check of its certificate can fail.
        let mut trusting_stranger = stranger.clone();
        trusting_stranger.ca = member.ca.clone();
        let client = client_config(&trusting_stranger, ALPN).expect("client config");
        let server = server_config(&member, ALPN).expect("server config");
        let err = handshake(client, server, &node_name(2)).expect_err("foreign client");
        assert!(err.starts_with("server"), "{err}");
        // A member dialing a server certified by another CA rejects it.
        let client = client_config(&dev(d2.path(), 3), ALPN).expect("client config");
        let server = server_config(&stranger, ALPN).expect("server config");
        let err = handshake(client, server, &node_name(1)).expect_err("foreign server");
        assert!(err.starts_with("client"), "{err}");
    }

    #[test]
    fn insecure_or_unset_is_refused_with_an_explanation() {
        let err = load(&TlsConfig::InsecurePlaintext, 1).expect_err("insecure");
        assert!(err.contains("mutual TLS"), "{err}");
        let err = load(&TlsConfig::default(), 1).expect_err("unset");
        assert!(err.contains("TlsConfig::Files"), "{err}");
    }

    #[test]
    fn load_errors_name_the_missing_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let paths = generate_dev_certs(dir.path(), &[1]).expect("dev certs");
        let missing: PathBuf = dir.path().join("nope.pem");
        let err = load(
            &TlsConfig::Files {
                ca_cert: missing.clone(),
                node_cert: paths[0].node_cert.clone(),
                node_key: paths[0].node_key.clone(),
            },
            1,
        )
        .expect_err("missing CA");
        assert!(err.contains(&missing.display().to_string()), "{err}");
        let err = load(
            &TlsConfig::Files {
                ca_cert: paths[0].ca_cert.clone(),
                node_cert: paths[0].node_cert.clone(),
                node_key: missing.clone(),
            },
            1,
        )
        .expect_err("missing key");
        assert!(err.contains(&missing.display().to_string()), "{err}");
    }

    #[test]
    fn load_errors_name_the_garbage_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let paths = generate_dev_certs(dir.path(), &[1]).expect("dev certs");
        let text = dir.path().join("text.pem");
        std::fs::write(&text, "this is not PEM at all\n").expect("write");
        let broken = dir.path().join("broken.pem");
        std::fs::write(
            &broken,
            "-----BEGIN CERTIFICATE-----\n!!not base64!!\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        for bad in [&text, &broken] {
            let err =
                load_files(bad, &paths[0].node_cert, &paths[0].node_key).expect_err("garbage CA");
            assert!(err.contains(&bad.display().to_string()), "{err}");
            let err =
                load_files(&paths[0].ca_cert, bad, &paths[0].node_key).expect_err("garbage cert");
            assert!(err.contains(&bad.display().to_string()), "{err}");
        }
        let err = load_files(&paths[0].ca_cert, &paths[0].node_cert, &text).expect_err("no key");
        assert!(err.contains(&text.display().to_string()), "{err}");
    }

    #[test]
    fn material_debug_never_prints_the_key() {
        let dir = tempfile::tempdir().expect("temp dir");
        let m = dev(dir.path(), 1);
        let shown = format!("{m:?}");
        assert!(shown.contains("redacted"), "{shown}");
    }
}
