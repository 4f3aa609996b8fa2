//! Development certificates for mutual TLS, and reading the organisation a
//! client certificate names.
//!
//! `cleanroom certs init` makes a CA and a server certificate; `cleanroom
//! certs issue --org NAME` makes a client certificate whose subject common
//! name is the organisation. Certificates from an existing CA work the same
//! way (see `docs/certificates.md`).

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const SERVER_CERT: &str = "server.pem";
pub const SERVER_KEY: &str = "server-key.pem";

/// Why a certificate could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{path}: already exists; pass --force to replace it")]
    Exists { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a usable PEM certificate or key")]
    BadPem { path: PathBuf },
    #[error("organisation name {0:?} must be 1-63 characters of a-z, 0-9 and '-'")]
    BadOrg(String),
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

/// Files written by [`init`].
#[derive(Debug, Clone)]
pub struct CaFiles {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

/// Files written by [`issue_client`].
#[derive(Debug, Clone)]
pub struct ClientFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::days(1);
    params.not_after = now + Duration::days(days);
}

/// Creates a development CA and a server certificate for `localhost`,
/// `127.0.0.1`, `::1` and any `extra_names` in `dir`.
pub fn init(dir: &Path, extra_names: &[String], force: bool) -> Result<CaFiles, CertError> {
    std::fs::create_dir_all(dir).map_err(|source| CertError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let files = CaFiles {
        ca_cert: dir.join(CA_CERT),
        ca_key: dir.join(CA_KEY),
        server_cert: dir.join(SERVER_CERT),
        server_key: dir.join(SERVER_KEY),
    };
    if !force {
        for path in [
            &files.ca_cert,
            &files.ca_key,
            &files.server_cert,
            &files.server_key,
        ] {
            if path.exists() {
                return Err(CertError::Exists { path: path.clone() });
            }
        }
    }

    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Cleanroom development CA");
    dn.push(DnType::OrganizationName, "Cleanroom");
    ca_params.distinguished_name = dn;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut ca_params, 3650);
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, &ca_key);

    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    names.extend(extra_names.iter().cloned());
    let server_key = KeyPair::generate()?;
    let mut server_params = CertificateParams::new(names)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "cleanroom-server");
    server_params.distinguished_name = dn;
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    validity(&mut server_params, 825);
    let server_cert = server_params.signed_by(&server_key, &issuer)?;

    write_file(&files.ca_cert, ca_cert.pem().as_bytes(), false, force)?;
    write_file(
        &files.ca_key,
        ca_key.serialize_pem().as_bytes(),
        true,
        force,
    )?;
    write_file(
        &files.server_cert,
        server_cert.pem().as_bytes(),
        false,
        force,
    )?;
    write_file(
        &files.server_key,
        server_key.serialize_pem().as_bytes(),
        true,
        force,
    )?;
    Ok(files)
}

/// Issues a client certificate for organisation `org`, signed by the CA in
/// `dir`, as `dir/ORG.pem` and `dir/ORG-key.pem`.
pub fn issue_client(dir: &Path, org: &str, force: bool) -> Result<ClientFiles, CertError> {
    if !is_org_name(org) {
        return Err(CertError::BadOrg(org.to_string()));
    }
    let files = ClientFiles {
        cert: dir.join(format!("{org}.pem")),
        key: dir.join(format!("{org}-key.pem")),
    };
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, org);
    dn.push(DnType::OrganizationName, org);
    params.distinguished_name = dn;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    sign(dir, params, files, force)
}

/// The organisational unit that marks a certificate of the worker role:
/// the server's and its workers' identity toward each other. A partner's
/// certificate never has it, and its common name (`worker.NAME`) is no
/// organisation's name, so no partner-facing call accepts it.
pub const WORKER_UNIT: &str = "cleanroom-worker";

/// The files [`issue_worker`] writes for worker `name` in `dir`.
pub fn worker_files(dir: &Path, name: &str) -> ClientFiles {
    ClientFiles {
        cert: dir.join(format!("worker-{name}.pem")),
        key: dir.join(format!("worker-{name}-key.pem")),
    }
}

/// Issues a certificate of the worker role, signed by the CA in `dir`, as
/// `dir/worker-NAME.pem` and its key: for a worker's port (`localhost`,
/// `127.0.0.1`, `::1` and `extra_names`) and for its calls to the server's
/// other workers. The server presents one too when it calls workers.
pub fn issue_worker(
    dir: &Path,
    name: &str,
    extra_names: &[String],
    force: bool,
) -> Result<ClientFiles, CertError> {
    if !is_org_name(name) {
        return Err(CertError::BadOrg(name.to_string()));
    }
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    names.extend(extra_names.iter().cloned());
    let mut params = CertificateParams::new(names)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("worker.{name}"));
    dn.push(DnType::OrganizationalUnitName, WORKER_UNIT);
    params.distinguished_name = dn;
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    sign(dir, params, worker_files(dir, name), force)
}

/// Signs `params` with the CA in `dir` (for 825 days, a new key) and
/// writes the certificate and key as `files`, unless they exist and not
/// `force`.
fn sign(
    dir: &Path,
    mut params: CertificateParams,
    files: ClientFiles,
    force: bool,
) -> Result<ClientFiles, CertError> {
    let ca_cert_path = dir.join(CA_CERT);
    let ca_key_path = dir.join(CA_KEY);
    let ca_pem = read_text(&ca_cert_path)?;
    let ca_key_pem = read_text(&ca_key_path)?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|_| CertError::BadPem {
        path: ca_key_path.clone(),
    })?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, &ca_key).map_err(|_| CertError::BadPem {
        path: ca_cert_path.clone(),
    })?;
    if !force {
        for path in [&files.cert, &files.key] {
            if path.exists() {
                return Err(CertError::Exists { path: path.clone() });
            }
        }
    }
    let key = KeyPair::generate()?;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    validity(&mut params, 825);
    let cert = params.signed_by(&key, &issuer)?;
    write_file(&files.cert, cert.pem().as_bytes(), false, force)?;
    write_file(&files.key, key.serialize_pem().as_bytes(), true, force)?;
    Ok(files)
}

/// Whether a certificate (DER) is of the worker role. The chain itself has
/// already been verified by TLS.
pub fn is_worker(der: &[u8]) -> bool {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return false;
    };
    let unit = cert
        .subject()
        .iter_organizational_unit()
        .any(|u| u.as_str() == Ok(WORKER_UNIT));
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
        .is_some_and(|c| c.starts_with("worker."));
    unit && cn
}

/// Whether the first certificate of a PEM file is of the worker role.
pub fn pem_is_worker(pem: &[u8]) -> bool {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem)
        .next()
        .and_then(Result::ok)
        .is_some_and(|c| is_worker(c.as_ref()))
}

/// Organisation names as they appear in certificates and policies.
pub fn is_org_name(s: &str) -> bool {
    crate::policy::is_slug(s)
}

/// The organisation a client certificate (DER) names: its subject common
/// name, if that is a valid organisation name. The chain itself has already
/// been verified by TLS.
pub fn organisation_of(der: &[u8]) -> Option<String> {
    if is_worker(der) {
        return None;
    }
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    is_org_name(cn).then(|| cn.to_string())
}

fn read_text(path: &Path) -> Result<String, CertError> {
    std::fs::read_to_string(path).map_err(|source| CertError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes a file; private ones are created owner-read/write only (0600).
pub(crate) fn write_file(
    path: &Path,
    contents: &[u8],
    private: bool,
    overwrite: bool,
) -> Result<(), CertError> {
    let io = |source| CertError::Io {
        path: path.to_path_buf(),
        source,
    };
    if overwrite && path.exists() {
        std::fs::remove_file(path).map_err(io)?;
    }
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    options.mode(if private { 0o600 } else { 0o644 });
    let mut file = options.open(path).map_err(io)?;
    file.write_all(contents).map_err(io)?;
    file.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn init_then_issue_names_the_org_and_keeps_keys_private() {
        let dir = tempfile::tempdir().unwrap();
        let files = init(dir.path(), &[], false).unwrap();
        let client = issue_client(dir.path(), "acme", false).unwrap();
        for key in [&files.ca_key, &files.server_key, &client.key] {
            let mode = std::fs::metadata(key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
        let pem = std::fs::read_to_string(&client.cert).unwrap();
        let der = x509_parser::pem::parse_x509_pem(pem.as_bytes())
            .unwrap()
            .1
            .contents;
        assert_eq!(organisation_of(&der).as_deref(), Some("acme"));
    }

    #[test]
    fn refuses_to_overwrite_without_force() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), &[], false).unwrap();
        assert!(matches!(
            init(dir.path(), &[], false),
            Err(CertError::Exists { .. })
        ));
        init(dir.path(), &[], true).unwrap();
        issue_client(dir.path(), "acme", false).unwrap();
        assert!(matches!(
            issue_client(dir.path(), "acme", false),
            Err(CertError::Exists { .. })
        ));
    }

    #[test]
    fn rejects_bad_org_names() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), &[], false).unwrap();
        for bad in ["", "Acme", "a b", "../x", "acme_corp"] {
            assert!(matches!(
                issue_client(dir.path(), bad, false),
                Err(CertError::BadOrg(_))
            ));
        }
    }
}
