//! Where the store is and how to reach it: a `postgres://` URL (libpq's form), its TLS mode
//! and password from the URL or from what the caller read from the environment, and the
//! schema that holds thinkrag's tables.

use std::sync::Arc;

use postgres::config::SslMode;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;
use url::Url;

use crate::error::PgStoreError;

/// The schema thinkrag's tables live in when the URL names none (`?schema=NAME`).
pub const DEFAULT_SCHEMA: &str = "thinkrag";

/// What the caller takes from the environment, as libpq does (`PGPASSWORD`, `PGSSLMODE`,
/// `PGSSLROOTCERT`); the URL's own values win. Kept apart from the URL so that this library
/// reads no environment itself.
#[derive(Clone, Debug, Default)]
pub struct PgOptions {
    /// The password when the URL has none.
    pub password: Option<String>,
    /// The TLS mode when the URL gives none (libpq's names).
    pub sslmode: Option<String>,
    /// A PEM file of root certificates to verify the server with when the URL gives none.
    pub sslrootcert: Option<String>,
}

impl PgOptions {
    /// `PGPASSWORD`, `PGSSLMODE` and `PGSSLROOTCERT`, for binaries that follow libpq.
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        Self {
            password: var("PGPASSWORD"),
            sslmode: var("PGSSLMODE"),
            sslrootcert: var("PGSSLROOTCERT"),
        }
    }
}

/// How the server's certificate is checked, by libpq's `sslmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    /// No TLS.
    Disable,
    /// TLS when the server offers it, certificate not checked (libpq's default).
    Prefer,
    /// TLS required, certificate not checked.
    Require,
    /// TLS required, certificate chain checked against the roots.
    VerifyCa,
    /// TLS required, chain and host name checked.
    VerifyFull,
}

impl TlsMode {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "disable" | "allow" => TlsMode::Disable,
            "prefer" => TlsMode::Prefer,
            "require" => TlsMode::Require,
            "verify-ca" => TlsMode::VerifyCa,
            "verify-full" => TlsMode::VerifyFull,
            _ => return None,
        })
    }
}

/// A parsed store location.
#[derive(Clone, Debug)]
pub struct PgLocation {
    /// The client configuration (host, port, user, password, database, TLS requirement).
    pub config: postgres::Config,
    /// The schema of thinkrag's tables.
    pub schema: String,
    /// How certificates are checked.
    pub tls: TlsMode,
    /// Root certificates file for `verify-ca`/`verify-full` (else the Mozilla roots).
    pub root_cert: Option<String>,
    /// The URL without its password, for messages.
    pub display: String,
}

/// Whether `s` names a PostgreSQL store rather than a directory.
pub fn is_postgres_url(s: &str) -> bool {
    s.starts_with("postgres://") || s.starts_with("postgresql://")
}

/// The URL without its password.
pub fn redact(url: &str) -> String {
    match Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "(unparseable URL)".to_string(),
    }
}

impl PgLocation {
    /// Parses `postgres://user[:password]@host[:port]/database[?sslmode=..&sslrootcert=..&schema=..]`
    /// (plus the other parameters libpq's URLs take that tokio-postgres knows).
    pub fn parse(url: &str, opts: &PgOptions) -> Result<Self, PgStoreError> {
        let display = redact(url);
        let invalid = |reason: String| PgStoreError::InvalidUrl {
            url: display.clone(),
            reason,
        };
        let mut parsed = Url::parse(url).map_err(|e| invalid(e.to_string()))?;
        let mut schema = DEFAULT_SCHEMA.to_string();
        let mut sslmode = opts.sslmode.clone();
        let mut root_cert = opts.sslrootcert.clone();
        let mut kept = Vec::new();
        for (k, v) in parsed.query_pairs() {
            match &*k {
                "schema" => schema = v.into_owned(),
                "sslmode" => sslmode = Some(v.into_owned()),
                "sslrootcert" => root_cert = Some(v.into_owned()),
                _ => kept.push((k.into_owned(), v.into_owned())),
            }
        }
        if !valid_identifier(&schema) {
            return Err(invalid(format!(
                "schema {schema:?} is not a plain lower-case SQL name (letters, digits, _; at most 63)"
            )));
        }
        let tls = match sslmode.as_deref() {
            None => TlsMode::Prefer,
            Some(m) => TlsMode::parse(m).ok_or_else(|| {
                invalid(format!(
                    "sslmode {m:?}: expected disable, prefer, require, verify-ca or verify-full"
                ))
            })?,
        };
        if kept.is_empty() {
            parsed.set_query(None);
        } else {
            parsed.query_pairs_mut().clear().extend_pairs(kept);
        }
        let mut config: postgres::Config = parsed
            .as_str()
            .parse()
            .map_err(|e: postgres::Error| invalid(e.to_string()))?;
        if config.get_password().is_none() {
            if let Some(p) = &opts.password {
                config.password(p.as_str());
            }
        }
        if config.get_user().is_none() {
            return Err(invalid(
                "no user: name one, as in postgres://USER@host/database".into(),
            ));
        }
        config.ssl_mode(match tls {
            TlsMode::Disable => SslMode::Disable,
            TlsMode::Prefer => SslMode::Prefer,
            _ => SslMode::Require,
        });
        config.application_name("thinkrag");
        Ok(Self {
            config,
            schema,
            tls,
            root_cert,
            display,
        })
    }

    /// The TLS connector for this location's mode (rustls on ring, set up here rather than as
    /// a process-wide default provider).
    pub fn connector(&self) -> Result<MakeRustlsConnect, PgStoreError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls_error = |reason: String| PgStoreError::Tls {
            url: self.display.clone(),
            reason,
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_error(e.to_string()))?;
        let chain = match self.tls {
            TlsMode::Disable | TlsMode::Prefer | TlsMode::Require => None,
            TlsMode::VerifyCa | TlsMode::VerifyFull => {
                let roots = self.roots().map_err(tls_error)?;
                Some(
                    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .build()
                        .map_err(|e| tls_error(e.to_string()))?,
                )
            }
        };
        let config = builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(CertCheck {
                chain,
                check_name: self.tls == TlsMode::VerifyFull,
                provider,
            }))
            .with_no_client_auth();
        Ok(MakeRustlsConnect::new(config))
    }

    /// The root certificates: the `sslrootcert` file, else Mozilla's.
    fn roots(&self) -> Result<RootCertStore, String> {
        let mut roots = RootCertStore::empty();
        match &self.root_cert {
            Some(path) => {
                let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                    .map_err(|e| format!("cannot read sslrootcert {path}: {e}"))?
                    .collect::<Result<_, _>>()
                    .map_err(|e| format!("sslrootcert {path} is not PEM certificates: {e}"))?;
                if certs.is_empty() {
                    return Err(format!("sslrootcert {path} holds no certificate"));
                }
                for cert in certs {
                    roots
                        .add(cert)
                        .map_err(|e| format!("sslrootcert {path}: {e}"))?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        Ok(roots)
    }
}

/// Lower-case SQL identifiers only, so a schema name never needs quoting rules beyond `"`.
fn valid_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && s.len() <= 63
}

/// How the server's certificate is checked, by libpq's `sslmode`: `prefer`/`require` encrypt
/// without checking who the server is (`chain` unset); `verify-ca` checks the chain against the
/// roots; `verify-full` also the host name. The handshake signatures are verified in every mode.
#[derive(Debug)]
struct CertCheck {
    chain: Option<Arc<WebPkiServerVerifier>>,
    check_name: bool,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for CertCheck {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_thinkrag_parameters_and_keeps_the_rest() {
        let loc = PgLocation::parse(
            "postgres://alice:s3cret@db.example:6543/rag?schema=team_docs&sslmode=verify-full&connect_timeout=5",
            &PgOptions::default(),
        )
        .unwrap();
        assert_eq!(loc.schema, "team_docs");
        assert_eq!(loc.tls, TlsMode::VerifyFull);
        assert_eq!(loc.config.get_user(), Some("alice"));
        assert_eq!(loc.config.get_password(), Some(&b"s3cret"[..]));
        assert_eq!(loc.config.get_dbname(), Some("rag"));
        assert_eq!(loc.config.get_ports(), &[6543]);
        assert_eq!(
            loc.config.get_connect_timeout(),
            Some(&std::time::Duration::from_secs(5))
        );
        assert!(!loc.display.contains("s3cret"), "{}", loc.display);
    }

    #[test]
    fn environment_fills_what_the_url_leaves_out() {
        let opts = PgOptions {
            password: Some("from-env".into()),
            sslmode: Some("require".into()),
            sslrootcert: None,
        };
        let loc = PgLocation::parse("postgres://bob@localhost/db", &opts).unwrap();
        assert_eq!(loc.config.get_password(), Some(&b"from-env"[..]));
        assert_eq!(loc.tls, TlsMode::Require);
        assert_eq!(loc.schema, DEFAULT_SCHEMA);
        let loc =
            PgLocation::parse("postgres://bob:url@localhost/db?sslmode=disable", &opts).unwrap();
        assert_eq!(loc.config.get_password(), Some(&b"url"[..]));
        assert_eq!(loc.tls, TlsMode::Disable);
    }

    #[test]
    fn bad_urls_are_named_without_their_password() {
        for (url, needle) in [
            ("postgres://u:pw@h/db?schema=Robert%27);DROP", "schema"),
            ("postgres://u:pw@h/db?sslmode=sometimes", "sslmode"),
            ("postgres://h/db", "no user"),
        ] {
            let e = PgLocation::parse(url, &PgOptions::default()).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains(needle), "{msg}");
            assert!(!msg.contains("pw@"), "{msg}");
        }
    }
}
