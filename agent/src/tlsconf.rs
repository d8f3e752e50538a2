//! rustls configurations around a token-held identity, and reading PEM files.

use firmware_config::schema::KxGroup;
use hsm_shim::rustls;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{ClientConfig, RootCertStore, ServerConfig, SupportedProtocolVersion};
use std::path::Path;
use std::sync::Arc;

/// Errors building a TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfError {
    /// A PEM file could not be read or holds no certificate.
    #[error("{path}: {reason}")]
    Pem {
        /// File.
        path: String,
        /// Why.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration refused: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Which TLS versions to offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
pub enum TlsVersions {
    /// TLS 1.3 and 1.2.
    #[default]
    Any,
    /// TLS 1.3 only.
    #[value(name = "1.3")]
    Tls13,
    /// TLS 1.2 only.
    #[value(name = "1.2")]
    Tls12,
}

static TLS13_ONLY: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];
static TLS12_ONLY: &[&SupportedProtocolVersion] = &[&rustls::version::TLS12];

impl TlsVersions {
    fn list(self) -> &'static [&'static SupportedProtocolVersion] {
        match self {
            TlsVersions::Any => rustls::ALL_VERSIONS,
            TlsVersions::Tls13 => TLS13_ONLY,
            TlsVersions::Tls12 => TLS12_ONLY,
        }
    }
}

/// The crypto provider: ring (see ARCHITECTURE.md for why). Token keys sign in the token.
///
/// Cipher suites: AES-128-GCM with SHA-256 first, then ChaCha20-Poly1305, then AES-256-GCM
/// with SHA-384 (ring's default puts the last first). The identities are P-256 or RSA-2048/3072
/// keys with x25519 or P-256 key exchange, all at the 128-bit level, so AES-256 adds cost and
/// no strength; and gateway CPUs (Cortex-A53/A7) hash SHA-256 in hardware or far faster than
/// SHA-384, which TLS 1.3 uses for every handshake secret and transcript hash of that suite.
///
/// Key exchange: `[tls] kx` (set by [`set_default_kx`] when the configuration loads), by
/// default X25519MLKEM768 first, then X25519 and P-256 (see kx.rs).
pub fn provider() -> Arc<CryptoProvider> {
    provider_with(&default_kx())
}

/// The groups the agent's own connections offer now.
pub fn default_kx() -> Vec<KxGroup> {
    DEFAULT_KX
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .unwrap_or_else(firmware_config::tls::default_kx)
}

/// Set the groups the agent's own connections offer (`[tls] kx`).
pub fn set_default_kx(kx: &[KxGroup]) {
    *DEFAULT_KX.write().unwrap_or_else(|p| p.into_inner()) = Some(kx.to_vec());
}

static DEFAULT_KX: std::sync::RwLock<Option<Vec<KxGroup>>> = std::sync::RwLock::new(None);

/// The provider offering `kx`, in that order (one per list, made once).
pub fn provider_with(kx: &[KxGroup]) -> Arc<CryptoProvider> {
    static MADE: std::sync::Mutex<Vec<(Vec<KxGroup>, Arc<CryptoProvider>)>> =
        std::sync::Mutex::new(Vec::new());
    let mut made = MADE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, p)) = made.iter().find(|(k, _)| k == kx) {
        return p.clone();
    }
    let p = Arc::new(CryptoProvider {
        kx_groups: kx.iter().map(|g| crate::kx::group(*g)).collect(),
        ..(*base_provider()).clone()
    });
    made.push((kx.to_vec(), p.clone()));
    p
}

fn base_provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite as cs;
    static PROVIDER: std::sync::OnceLock<Arc<CryptoProvider>> = std::sync::OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            Arc::new(CryptoProvider {
                cipher_suites: vec![
                    cs::TLS13_AES_128_GCM_SHA256,
                    cs::TLS13_CHACHA20_POLY1305_SHA256,
                    cs::TLS13_AES_256_GCM_SHA384,
                    cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
                    cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
                    cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
                    cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
                    cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
                    cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
                ],
                ..rustls::crypto::ring::default_provider()
            })
        })
        .clone()
}

/// Read every certificate of a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsConfError> {
    let err = |reason: String| TlsConfError::Pem {
        path: path.display().to_string(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(format!("not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(err("no CERTIFICATE block in the file".into()));
    }
    Ok(certs)
}

/// A root store from a PEM bundle.
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsConfError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(path)? {
        roots.add(c).map_err(|e| TlsConfError::Pem {
            path: path.display().to_string(),
            reason: format!("CA certificate refused: {e}"),
        })?;
    }
    Ok(roots)
}

/// A root store from certificates already read.
pub fn roots_of(certs: &[CertificateDer<'static>]) -> Result<RootCertStore, TlsConfError> {
    let mut roots = RootCertStore::empty();
    for c in certs {
        roots.add(c.clone())?;
    }
    Ok(roots)
}

/// A client config presenting `identity` (if any) and trusting `roots`.
pub fn client_config(
    identity: Option<Arc<CertifiedKey>>,
    roots: RootCertStore,
    versions: TlsVersions,
) -> Result<ClientConfig, TlsConfError> {
    let b = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions.list())?
        .with_root_certificates(roots);
    Ok(match identity {
        Some(id) => b.with_client_cert_resolver(Arc::new(SingleCertAndKey::from(id))),
        None => b.with_no_client_auth(),
    })
}

/// A server config presenting `identity`; when `client_roots` is given, client certs are required.
pub fn server_config(
    identity: Arc<CertifiedKey>,
    client_roots: Option<RootCertStore>,
    versions: TlsVersions,
) -> Result<ServerConfig, TlsConfError> {
    let b =
        ServerConfig::builder_with_provider(provider()).with_protocol_versions(versions.list())?;
    let b = match client_roots {
        Some(roots) => {
            let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            )
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
            b.with_client_cert_verifier(v)
        }
        None => b.with_no_client_auth(),
    };
    Ok(b.with_cert_resolver(Arc::new(SingleCertAndKey::from(identity))))
}

/// A verifier that checks the server's chain against `roots` and its name against `name`,
/// whatever host was dialled: the MQTT client dials `broker`'s host, and
/// `fleet.mqtt.server_name` says which name the broker's certificate must carry.
pub fn named_verifier(
    roots: Arc<RootCertStore>,
    name: &str,
) -> crate::error::Result<Arc<dyn rustls::client::danger::ServerCertVerifier>> {
    let inner =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider()).build()?;
    let name = rustls::pki_types::ServerName::try_from(name.to_owned())
        .map_err(|_| crate::err!("'{name}' is not a DNS name or IP address"))?;
    Ok(Arc::new(NamedVerifier { inner, name }))
}

#[derive(Debug)]
struct NamedVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    name: rustls::pki_types::ServerName<'static>,
}

impl rustls::client::danger::ServerCertVerifier for NamedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _dialled: &rustls::pki_types::ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
