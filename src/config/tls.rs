//! TLS files named in the config: the listener's certificate and key, and an upstream's
//! private CA (README "TLS", "HTTPS upstreams"). Read and checked at load, so that `check`
//! and a reload refuse a bad pair before anything serves with it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

/// The listener's certificate chain and key, checked to belong together.
#[derive(Clone)]
pub struct ServerCert {
    /// Where the chain was read from.
    pub cert_file: PathBuf,
    /// Where the key was read from.
    pub key_file: PathBuf,
    /// What rustls serves.
    pub certified: Arc<CertifiedKey>,
    /// The leaf certificate's subject, e.g. `CN=media.studio.example`.
    pub subject: String,
    /// The leaf certificate's names (DNS and IP subject alternative names).
    pub names: Vec<String>,
    /// The leaf certificate's expiry, in seconds since the Unix epoch.
    pub not_after: i64,
}

impl fmt::Debug for ServerCert {
    // The key stays out of every rendering (README "TLS").
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerCert")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("subject", &self.subject)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl PartialEq for ServerCert {
    fn eq(&self, other: &ServerCert) -> bool {
        self.cert_file == other.cert_file
            && self.key_file == other.key_file
            && self.certified.cert == other.certified.cert
    }
}

/// The crypto provider for every TLS configuration mediaroute makes: named explicitly so
/// that no other crate's default can change it.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Client TLS settings that trust `roots`: TLS 1.2 and 1.3, SNI and verification on.
pub fn client_config(roots: Arc<RootCertStore>) -> rustls::ClientConfig {
    rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        // Not input-dependent: ring supports both safe default versions.
        .expect("ring supports TLS 1.2 and 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// Reads a PEM certificate chain (leaf first) and its private key (PKCS#8, RSA or SEC1).
pub fn load_server_cert(cert_file: &Path, key_file: &Path) -> Result<ServerCert, String> {
    let chain = read_certs(cert_file)?;
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            format!("{}: no private key found (expected PEM: PKCS#8, RSA or EC)", key_file.display())
        }
        e => format!("{}: cannot read the private key: {}", key_file.display(), pem_error(&e)),
    })?;
    let leaf = chain.first().cloned().ok_or_else(|| format!("{}: no certificate found", cert_file.display()))?;
    let certified = CertifiedKey::from_der(chain, key, &provider()).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => {
            format!("{} does not belong to the certificate in {}", key_file.display(), cert_file.display())
        }
        e => format!("{}: unusable private key: {e}", key_file.display()),
    })?;
    let (subject, names, not_after) = describe(&leaf).map_err(|e| format!("{}: {e}", cert_file.display()))?;
    Ok(ServerCert {
        cert_file: cert_file.to_path_buf(),
        key_file: key_file.to_path_buf(),
        certified: Arc::new(certified),
        subject,
        names,
        not_after,
    })
}

/// A warning when the certificate has expired or expires within 14 days of `now`:
/// `check` prints it and every load logs it (README "TLS").
pub fn expiry_warning(cert: &ServerCert, now: std::time::SystemTime) -> Option<String> {
    let now = now.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let left = cert.not_after.saturating_sub(now);
    let file = cert.cert_file.display();
    if left <= 0 {
        Some(format!(
            "listen.tls_cert: the certificate in {file} ({}) has expired: clients will refuse it",
            cert.subject
        ))
    } else if left < 14 * 86_400 {
        Some(format!("listen.tls_cert: the certificate in {file} ({}) expires in {} hours", cert.subject, left / 3600))
    } else {
        None
    }
}

/// An upstream's private CA: the only roots its certificate is verified against.
#[derive(Clone)]
pub struct CaFile {
    /// Where the certificates were read from.
    pub path: PathBuf,
    /// The trust anchors.
    pub roots: Arc<RootCertStore>,
}

impl fmt::Debug for CaFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaFile").field("path", &self.path).field("roots", &self.roots.len()).finish()
    }
}

/// Reads one or more PEM CA certificates.
pub fn load_ca(path: &Path) -> Result<CaFile, String> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path)? {
        roots.add(cert).map_err(|e| format!("{}: not a usable CA certificate: {e}", path.display()))?;
    }
    Ok(CaFile { path: path.to_path_buf(), roots: Arc::new(roots) })
}

/// Every certificate in a PEM file; at least one.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: cannot read certificates: {}", path.display(), pem_error(&e)))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate found (expected PEM \"BEGIN CERTIFICATE\")", path.display()));
    }
    Ok(certs)
}

/// What is wrong with a PEM file, without any of its bytes: a malformed key file's
/// contents must never reach a log or `check`'s output (README "TLS").
fn pem_error(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    match e {
        Error::Io(io) => io.to_string(),
        Error::MissingSectionEnd { .. } => "malformed PEM: a section has no END line (is the file on one line?)".into(),
        Error::IllegalSectionStart { .. } => "malformed PEM: a BEGIN line is not on a line of its own".into(),
        Error::Base64Decode(_) => "malformed PEM: a section is not valid base64 (an encrypted key?)".into(),
        Error::NoItemsFound => "no PEM section found".into(),
        Error::SectionTooLarge => "malformed PEM: a section is larger than 256 MB".into(),
        _ => "malformed PEM".into(),
    }
}

/// The subject, subject alternative names and expiry of a certificate.
fn describe(cert: &CertificateDer<'_>) -> Result<(String, Vec<String>, i64), String> {
    use x509_parser::extensions::GeneralName;
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|e| format!("not a valid certificate: {e}"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => names.push((*d).to_string()),
                GeneralName::IPAddress(b) => {
                    let ip = <[u8; 4]>::try_from(*b)
                        .map(std::net::IpAddr::from)
                        .or_else(|_| <[u8; 16]>::try_from(*b).map(std::net::IpAddr::from));
                    names.extend(ip.map(|ip| ip.to_string()));
                }
                _ => {}
            }
        }
    }
    Ok((parsed.subject().to_string(), names, parsed.validity().not_after.timestamp()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).ok();
        p
    }

    fn pair(names: &[&str]) -> (String, String) {
        let ck = rcgen::generate_simple_self_signed(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap_or_else(|e| panic!("rcgen: {e}"));
        (ck.cert.pem(), ck.signing_key.serialize_pem())
    }

    #[test]
    fn a_matching_pair_loads_with_its_subject_names_and_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pair(&["media.studio.example", "127.0.0.1"]);
        let c = load_server_cert(&write(dir.path(), "c.pem", &cert), &write(dir.path(), "k.pem", &key)).unwrap();
        assert_eq!(c.names, ["media.studio.example", "127.0.0.1"]);
        assert!(c.subject.contains("CN="), "{}", c.subject);
        // rcgen's default validity ends in 4096.
        assert!(c.not_after > 4_000_000_000, "{}", c.not_after);
        let shown = format!("{c:?}");
        assert!(!shown.contains("PRIVATE") && !shown.contains("certified"), "{shown}");
    }

    #[test]
    fn rsa_and_sec1_keys_load_as_well_as_pkcs8() {
        let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/tls");
        // "BEGIN RSA PRIVATE KEY" (PKCS#1) and "BEGIN EC PRIVATE KEY" (SEC1, P-384).
        for (cert, key, name) in [("rsa-cert.pem", "rsa-key.pem", "rsa.test"), ("ec-cert.pem", "ec-key.pem", "ec.test")]
        {
            let c = load_server_cert(&corpus.join(cert), &corpus.join(key)).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(c.names, [name]);
        }
        // The demo chain: a leaf and its CA, a SEC1 P-256 key.
        let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/tls");
        let c = load_server_cert(&conf.join("demo-fullchain.pem"), &conf.join("demo-key.pem")).unwrap();
        assert_eq!(c.certified.cert.len(), 2);
        assert_eq!(c.names, ["localhost", "127.0.0.1", "::1"]);
        assert_eq!(load_ca(&conf.join("demo-ca.pem")).unwrap().roots.len(), 1);
        // The RSA key with the EC certificate: refused.
        let e = load_server_cert(&corpus.join("ec-cert.pem"), &corpus.join("rsa-key.pem")).unwrap_err();
        assert!(e.contains("does not belong"), "{e}");
    }

    #[test]
    fn an_expired_or_expiring_certificate_is_warned_about() {
        let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/tls");
        let c = load_server_cert(&conf.join("demo-fullchain.pem"), &conf.join("demo-key.pem")).unwrap();
        let at = |secs: i64| std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs as u64);
        assert_eq!(expiry_warning(&c, at(c.not_after - 15 * 86_400)), None);
        let soon = expiry_warning(&c, at(c.not_after - 3 * 3600 - 60)).unwrap();
        assert!(soon.contains("demo-fullchain.pem") && soon.contains("expires in 3 hours"), "{soon}");
        let gone = expiry_warning(&c, at(c.not_after + 1)).unwrap();
        assert!(gone.contains("has expired"), "{gone}");
    }

    #[test]
    fn a_malformed_key_file_is_reported_without_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pair(&["a.example"]);
        let c = write(dir.path(), "c.pem", &cert);
        let body: Vec<&str> = key.lines().filter(|l| !l.starts_with("-----")).collect();
        let one_line = key.replace('\n', " ");
        let glued = key.replacen("-----\n", "-----", 1);
        let encrypted = key.replace("PRIVATE KEY", "RSA PRIVATE KEY").replacen(
            "-----\n",
            "-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-256-CBC,0011\n\n",
            1,
        );
        for text in [one_line, glued, encrypted] {
            let e = load_server_cert(&c, &write(dir.path(), "k.pem", &text)).unwrap_err();
            assert!(e.contains("k.pem") && e.contains("PEM"), "{e}");
            for line in &body {
                assert!(!e.contains(&line[..16]), "key bytes in {e:?}");
            }
            assert!(!e.chars().any(|c| c.is_ascii_digit() && e.contains(", ")), "no byte lists: {e}");
        }
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, _) = pair(&["a.example"]);
        let (_, other_key) = pair(&["b.example"]);
        let e =
            load_server_cert(&write(dir.path(), "c.pem", &cert), &write(dir.path(), "k.pem", &other_key)).unwrap_err();
        assert!(e.contains("does not belong to the certificate"), "{e}");
    }

    #[test]
    fn missing_empty_and_swapped_files_say_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pair(&["a.example"]);
        let c = write(dir.path(), "c.pem", &cert);
        let k = write(dir.path(), "k.pem", &key);
        let e = load_server_cert(&dir.path().join("nope.pem"), &k).unwrap_err();
        assert!(e.contains("nope.pem") && e.contains("cannot read"), "{e}");
        let e = load_server_cert(&k, &k).unwrap_err();
        assert!(e.contains("no certificate found"), "{e}");
        let e = load_server_cert(&c, &c).unwrap_err();
        assert!(e.contains("no private key found"), "{e}");
        let e = load_ca(&write(dir.path(), "empty.pem", "")).unwrap_err();
        assert!(e.contains("no certificate found"), "{e}");
        assert_eq!(load_ca(&c).unwrap().roots.len(), 1);
    }
}
