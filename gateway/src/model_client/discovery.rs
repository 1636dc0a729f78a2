//! Where the model servers are: the configured names, resolved again and again, so replicas that come and
//! go behind one DNS name (a headless Kubernetes Service, a scaled compose service) are followed.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;

use super::pool::Pool;

/// A model-server address as configured: `http://host:port`, `host:port` or `host` (port 8001).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Host name or literal IP address.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

/// The model tier's port when an address names none.
const DEFAULT_PORT: u16 = 8001;

impl Target {
    /// Parses a comma-separated list of addresses.
    pub fn parse_list(list: &str) -> Result<Vec<Target>, String> {
        let targets = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(Target::parse)
            .collect::<Result<Vec<_>, _>>()?;
        if targets.is_empty() {
            return Err("no model-server address given".into());
        }
        Ok(targets)
    }

    fn parse(text: &str) -> Result<Target, String> {
        let rest = match text.split_once("://") {
            Some(("http", rest)) => rest,
            Some((scheme, _)) => {
                return Err(format!(
                    "`{text}`: give http://host:port or host:port, not {scheme}://; TLS is turned on by \
                     --model-server-ca"
                ));
            }
            None => text,
        };
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') {
            return Err(format!("`{text}` is not a host[:port] address"));
        }
        // `[::1]:8001`, `[::1]`, `host:8001`, `host`.
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            let (host, after) = bracketed
                .split_once(']')
                .ok_or_else(|| format!("`{text}`: unclosed `[`"))?;
            (host, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        let port = match port {
            Some(p) => p
                .parse()
                .map_err(|_| format!("`{text}`: `{p}` is not a port"))?,
            None => DEFAULT_PORT,
        };
        if host.is_empty() {
            return Err(format!("`{text}` has no host"));
        }
        Ok(Target {
            host: host.to_owned(),
            port,
        })
    }
}

/// The DNS seam: what a name resolves to now. Tests swap in a resolver they can change.
#[async_trait]
pub trait Resolve: Send + Sync + 'static {
    /// Every address `host` resolves to, with `port`.
    async fn resolve(&self, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>>;
}

/// The system resolver (getaddrinfo on the blocking pool), asked again on every refresh.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemResolver;

#[async_trait]
impl Resolve for SystemResolver {
    async fn resolve(&self, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
        Ok(tokio::net::lookup_host((host, port)).await?.collect())
    }
}

/// Resolves every target once; `None` when any of them failed, so a DNS hiccup never empties the pool.
async fn resolve_all(targets: &[Target], resolver: &dyn Resolve) -> Option<BTreeSet<SocketAddr>> {
    let mut addresses = BTreeSet::new();
    for target in targets {
        match resolver.resolve(&target.host, target.port).await {
            Ok(found) => addresses.extend(found),
            Err(e) => {
                tracing::warn!(host = %target.host, error = %e, "cannot resolve the model server; keeping the endpoints we have");
                return None;
            }
        }
    }
    Some(addresses)
}

/// Resolves the targets now and then every `interval`, updating `pool`, until the pool is dropped.
pub fn spawn(
    targets: Vec<Target>,
    resolver: Arc<dyn Resolve>,
    interval: Duration,
    pool: Weak<Pool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let resolved = resolve_all(&targets, resolver.as_ref()).await;
            let Some(pool) = pool.upgrade() else { return };
            match resolved {
                // An empty answer is treated like a failure: draining every replica on a transient
                // empty record set would turn a DNS blip into an outage.
                Some(addresses) if !addresses.is_empty() => pool.update(&addresses),
                Some(_) => {
                    tracing::warn!(
                        "the model-server names resolved to no address; keeping the endpoints we have"
                    )
                }
                None => {}
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_with_and_without_scheme_and_port() {
        let parsed =
            Target::parse_list("http://model-server:9000, localhost ,[::1]:8002,10.0.0.7:8001/")
                .unwrap();
        let expected = [
            ("model-server", 9000),
            ("localhost", 8001),
            ("::1", 8002),
            ("10.0.0.7", 8001),
        ];
        assert_eq!(
            parsed,
            expected
                .iter()
                .map(|(host, port)| Target {
                    host: (*host).into(),
                    port: *port
                })
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn bad_addresses_are_refused() {
        for bad in [
            "",
            "https://model-server:8001",
            "http://:8001",
            "host:port",
            "http://host/path",
            "[::1",
        ] {
            assert!(Target::parse_list(bad).is_err(), "{bad} was accepted");
        }
    }
}
