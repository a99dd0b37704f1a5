//! PEM files of CA certificates (`*.tls_ca_file`), read and checked once so
//! that a wrong path or a file that holds no certificate is refused at
//! start-up with the key's name, not at the first connection. Imports no
//! other module of the crate.

use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

/// Why a CA file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CaFileError {
    /// The file cannot be opened or read.
    #[error("cannot read {path}: {reason}")]
    Unreadable { path: String, reason: String },
    /// A PEM block is broken (bad base64, truncated).
    #[error("{path} is not a PEM file of certificates: {reason}")]
    Malformed { path: String, reason: String },
    /// The file parses but holds no `CERTIFICATE` block (a key, say).
    #[error("{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")]
    Empty { path: String },
}

/// The certificates of a PEM file, in file order; at least one. Blocks other
/// than `CERTIFICATE` (keys, CRLs) are skipped, as OpenSSL's CA files allow.
pub fn ca_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaFileError> {
    let shown = path.display().to_string();
    // Read first, so that a missing file is told apart from a malformed one.
    let pem =
        std::fs::read(path).map_err(|e| CaFileError::Unreadable { path: shown.clone(), reason: e.to_string() })?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CaFileError::Malformed { path: shown.clone(), reason: e.to_string() })?;
    if certs.is_empty() {
        return Err(CaFileError::Empty { path: shown });
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    // A self-signed certificate (`openssl req -x509`, P-256).
    const CERT: &str = "-----BEGIN CERTIFICATE-----
MIIBiDCCAS2gAwIBAgIUQDEGjXTWls+Aq9Mquc3wr2DENcQwCgYIKoZIzj0EAwIw
GTEXMBUGA1UEAwwOdW5pdC10ZXN0LXJvb3QwHhcNMjYxMTMwMTEwODAyWhcNMzYx
MTI3MTEwODAyWjAZMRcwFQYDVQQDDA51bml0LXRlc3Qtcm9vdDBZMBMGByqGSM49
AgEGCCqGSM49AwEHA0IABL72AweS28sN95Llre3zJCtvP12zzgv43qhgchCmdp6m
WEQnto0MyqZw4U/5WOZWLy+cvdKr04G4xJO4phsikCijUzBRMB0GA1UdDgQWBBSl
qZqw0J13jprM54bVWsEUfRAN9zAfBgNVHSMEGDAWgBSlqZqw0J13jprM54bVWsEU
fRAN9zAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0kAMEYCIQCAw7ORqAnp
GfCgtQThX/MKwIQK+aFNIPt2Zu+Dk5uvuQIhAIWu67zXq3mslpJi4GBJVav6ZQTN
d0RiXxZavr7mZR51
-----END CERTIFICATE-----
";

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        std::io::Write::write_all(&mut file, text.as_bytes()).expect("write");
        file
    }

    #[test]
    fn reads_certificates_and_skips_other_blocks() {
        let key = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        let f = file(&format!("{CERT}{key}{CERT}"));
        assert_eq!(ca_certificates(f.path()).expect("two certificates").len(), 2);
    }

    #[test]
    fn refuses_missing_empty_and_broken_files() {
        let missing = ca_certificates(Path::new("/nonexistent/ca.pem")).expect_err("missing");
        assert!(matches!(missing, CaFileError::Unreadable { .. }), "{missing}");
        let empty = ca_certificates(file("not a certificate\n").path()).expect_err("empty");
        assert!(matches!(empty, CaFileError::Empty { .. }), "{empty}");
        let broken = ca_certificates(file("-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n").path())
            .expect_err("broken");
        assert!(matches!(broken, CaFileError::Malformed { .. }), "{broken}");
    }
}
