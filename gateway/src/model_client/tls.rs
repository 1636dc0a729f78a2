//! TLS to the model tier, from the PEM files the configuration names.

use std::path::Path;

use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::config::Config;

use super::Target;

fn read(flag: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{flag} `{}`: {e}", path.display()))
}

/// The TLS of model-tier connections when `--model-server-ca` is set: that CA, the name the servers'
/// certificates must hold, and the client certificate for mutual TLS when one is given.
pub fn client_config(
    config: &Config,
    targets: &[Target],
) -> Result<Option<ClientTlsConfig>, String> {
    let Some(ca) = &config.model_server_ca else {
        return Ok(None);
    };
    let name = match (&config.model_server_tls_name, targets.first()) {
        (Some(name), _) => name.clone(),
        (None, Some(target)) => target.host.clone(),
        (None, None) => return Err("no model-server address to take the TLS name from".into()),
    };
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("--model-server-ca", ca)?))
        .domain_name(name);
    if let (Some(cert), Some(key)) = (
        &config.model_server_client_cert,
        &config.model_server_client_key,
    ) {
        tls = tls.identity(Identity::from_pem(
            read("--model-server-client-cert", cert)?,
            read("--model-server-client-key", key)?,
        ));
    }
    Ok(Some(tls))
}
