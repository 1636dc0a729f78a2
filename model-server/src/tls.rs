//! TLS of the gRPC port, from PEM files named on the command line.

use std::path::Path;

use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::config::Config;

/// A certificate or key that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("reading {what} `{path}`: {source}")]
pub struct TlsFileError {
    what: &'static str,
    path: String,
    source: std::io::Error,
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsFileError> {
    std::fs::read(path).map_err(|source| TlsFileError {
        what,
        path: path.display().to_string(),
        source,
    })
}

/// The gRPC port's TLS, when `--tls-cert` and `--tls-key` are given; with `--tls-client-ca`, clients must show a
/// certificate that CA signed.
pub fn server_config(config: &Config) -> Result<Option<ServerTlsConfig>, TlsFileError> {
    let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
        return Ok(None);
    };
    let identity = Identity::from_pem(read("--tls-cert", cert)?, read("--tls-key", key)?);
    let mut tls = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &config.tls_client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read("--tls-client-ca", ca)?));
    }
    Ok(Some(tls))
}
