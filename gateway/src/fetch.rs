//! Fetching images by URL without letting a user reach the gateway's own network.
//!
//! Every address is checked where it is used: IP literals before the request, host names inside the DNS
//! resolver handed to the HTTP client (so the address connected to is the address checked, and a second
//! DNS answer cannot differ from the first), and every redirect target again, since redirects are followed
//! here rather than by the client.

use std::error::Error as StdError;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ipnet::IpNet;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::{StatusCode, Url, header};

/// Why a URL could not be fetched.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    /// The URL is malformed or not http/https.
    #[error("invalid URL: {0}")]
    InvalidUrl(String),
    /// The URL (or a redirect) points somewhere the policy forbids.
    #[error("{0}")]
    Refused(#[from] Refused),
    /// The body is larger than the limit.
    #[error("image is larger than the limit of {limit} bytes")]
    TooLarge {
        /// The configured limit in bytes.
        limit: usize,
    },
    /// Connecting or downloading took too long.
    #[error("timed out fetching the image")]
    Timeout,
    /// The server could not be reached or did not answer with an image.
    #[error("{0}")]
    Upstream(String),
}

/// A refusal by the address policy, with the reason.
#[derive(Debug, Clone, thiserror::Error)]
pub struct Refused {
    host: String,
    addr: IpAddr,
    reason: &'static str,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let literal =
            self.host.trim_start_matches('[').trim_end_matches(']') == self.addr.to_string();
        if literal {
            write!(
                f,
                "URL refused: {} is not a public address ({})",
                self.addr, self.reason
            )?;
        } else {
            write!(
                f,
                "URL refused: {} resolves to {}, not a public address ({})",
                self.host, self.addr, self.reason
            )?;
        }
        f.write_str("; only public addresses can be fetched")
    }
}

/// Hosts and networks exempt from the address policy.
#[derive(Debug, Clone, Default)]
pub struct AllowList {
    nets: Vec<IpNet>,
    hosts: Vec<String>,
    suffixes: Vec<String>,
}

impl AllowList {
    /// Parses CIDRs, single addresses, host names and `*.suffix` patterns; empty entries are skipped.
    pub fn parse<'a>(entries: impl IntoIterator<Item = &'a str>) -> anyhow::Result<Self> {
        let mut list = AllowList::default();
        for entry in entries.into_iter().map(str::trim).filter(|e| !e.is_empty()) {
            if let Ok(net) = entry.parse::<IpNet>() {
                list.nets.push(net);
            } else if let Ok(ip) = entry
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
            {
                list.nets.push(IpNet::from(ip));
            } else if let Some(suffix) = entry.strip_prefix("*.") {
                list.suffixes
                    .push(format!(".{}", suffix.to_ascii_lowercase()));
            } else if entry
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
            {
                list.hosts.push(entry.to_ascii_lowercase());
            } else {
                anyhow::bail!(
                    "--fetch-allow entry `{entry}` is neither a CIDR, an address nor a host name"
                );
            }
        }
        Ok(list)
    }

    /// True when nothing is exempt.
    pub fn is_empty(&self) -> bool {
        self.nets.is_empty() && self.hosts.is_empty() && self.suffixes.is_empty()
    }

    fn allows_host(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.hosts.contains(&host) || self.suffixes.iter().any(|s| host.ends_with(s.as_str()))
    }

    fn allows_ip(&self, ip: IpAddr) -> bool {
        self.nets.iter().any(|net| net.contains(&ip))
    }
}

/// The address policy: public addresses only, unless allow-listed.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    allow: AllowList,
}

impl Policy {
    /// A policy exempting `allow`.
    pub fn new(allow: AllowList) -> Self {
        Policy { allow }
    }

    /// Whether `host`, resolved to `ip`, may be connected to.
    pub fn check(&self, host: &str, ip: IpAddr) -> Result<(), Refused> {
        if self.allow.allows_host(host) || self.allow.allows_ip(ip) {
            return Ok(());
        }
        match non_public_reason(ip) {
            Some(reason) => Err(Refused {
                host: host.to_owned(),
                addr: ip,
                reason,
            }),
            None => Ok(()),
        }
    }
}

/// Names the kind of non-public address `ip` is, or `None` for a public one.
pub fn non_public_reason(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => v4_reason(v4),
        IpAddr::V6(v6) => v6_reason(v6),
    }
}

fn v4_reason(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    if ip.is_unspecified() || a == 0 {
        Some("unspecified")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("private")
    } else if a == 100 && (64..128).contains(&b) {
        Some("shared (carrier-grade NAT)")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if ip.is_broadcast() || a >= 240 {
        Some("reserved")
    } else {
        None
    }
}

fn v6_reason(ip: Ipv6Addr) -> Option<&'static str> {
    let segments = ip.segments();
    if ip.is_unspecified() {
        Some("unspecified")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if let Some(v4) = ip.to_ipv4_mapped() {
        v4_reason(v4)
    } else if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        // NAT64 reaches the embedded IPv4 address.
        v4_reason(Ipv4Addr::from_bits(ip.to_bits() as u32))
    } else if segments[..6] == [0; 6] {
        // Deprecated IPv4-compatible form, still routed to the embedded address by some stacks.
        v4_reason(Ipv4Addr::from_bits(ip.to_bits() as u32))
    } else if ip.is_multicast() {
        Some("multicast")
    } else if (segments[0] & 0xfe00) == 0xfc00 {
        Some("unique-local")
    } else if (segments[0] & 0xffc0) == 0xfe80 || (segments[0] & 0xffc0) == 0xfec0 {
        Some("link-local")
    } else {
        None
    }
}

/// The DNS resolver given to the HTTP client: resolves with the system resolver, keeps only the addresses
/// the policy allows, and fails with [`Refused`] when none is left.
struct PolicyResolver {
    policy: Arc<Policy>,
}

impl Resolve for PolicyResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let addrs = filter_resolved(&policy, &host, resolved)?;
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// Keeps the allowed addresses of `host`; when there were some but none is allowed, the first refusal.
fn filter_resolved(
    policy: &Policy,
    host: &str,
    resolved: Vec<SocketAddr>,
) -> Result<Vec<SocketAddr>, FetchError> {
    if resolved.is_empty() {
        return Err(FetchError::Upstream(format!(
            "could not resolve host {host}"
        )));
    }
    let mut first_refusal = None;
    let allowed: Vec<SocketAddr> = resolved
        .into_iter()
        .filter(|addr| match policy.check(host, addr.ip()) {
            Ok(()) => true,
            Err(refused) => {
                first_refusal.get_or_insert(refused);
                false
            }
        })
        .collect();
    match (allowed.is_empty(), first_refusal) {
        (true, Some(refused)) => Err(FetchError::Refused(refused)),
        _ => Ok(allowed),
    }
}

/// Limits of one fetch.
#[derive(Debug, Clone)]
pub struct FetchLimits {
    /// Largest body accepted.
    pub max_bytes: usize,
    /// Redirects followed.
    pub max_redirects: usize,
    /// Time to establish a connection.
    pub connect_timeout: Duration,
    /// Time for the whole fetch, redirects included.
    pub total_timeout: Duration,
}

/// Downloads images by URL under the address policy and the limits.
#[derive(Clone)]
pub struct Fetcher {
    client: reqwest::Client,
    policy: Arc<Policy>,
    limits: FetchLimits,
}

impl Fetcher {
    /// Builds the HTTP client. Fails only if TLS cannot be set up.
    pub fn new(policy: Policy, limits: FetchLimits) -> anyhow::Result<Self> {
        // reqwest is built without a default crypto provider so as not to compile two; an error here means
        // one is already installed, which is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let policy = Arc::new(policy);
        let client = reqwest::Client::builder()
            .dns_resolver(Arc::new(PolicyResolver {
                policy: policy.clone(),
            }))
            // A proxy would connect on our behalf to addresses we never see.
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(limits.connect_timeout)
            .timeout(limits.total_timeout)
            .user_agent(concat!("image-gateway/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Fetcher {
            client,
            policy,
            limits,
        })
    }

    /// Fetches `url`, following at most the configured number of redirects.
    pub async fn fetch(&self, url: &str) -> Result<Bytes, FetchError> {
        let url = self.admit(url)?;
        tokio::time::timeout(self.limits.total_timeout, self.fetch_following(url))
            .await
            .unwrap_or(Err(FetchError::Timeout))
    }

    /// Parses `url` and makes the checks that come before any connection: the scheme, and the address of an IP
    /// literal. A host name's addresses are checked as they resolve.
    pub fn admit(&self, url: &str) -> Result<Url, FetchError> {
        let parsed = Url::parse(url).map_err(|e| FetchError::InvalidUrl(format!("{e}: {url}")))?;
        self.check_url(&parsed)?;
        Ok(parsed)
    }

    async fn fetch_following(&self, mut url: Url) -> Result<Bytes, FetchError> {
        let mut redirects = 0;
        loop {
            self.check_url(&url)?;
            let response = self
                .client
                .get(url.clone())
                .send()
                .await
                .map_err(classify)?;
            let status = response.status();
            if status.is_redirection() && status != StatusCode::NOT_MODIFIED {
                if redirects >= self.limits.max_redirects {
                    return Err(FetchError::Upstream(format!(
                        "more than {} redirects",
                        self.limits.max_redirects
                    )));
                }
                let location = response
                    .headers()
                    .get(header::LOCATION)
                    .and_then(|l| l.to_str().ok())
                    .ok_or_else(|| {
                        FetchError::Upstream(format!(
                            "redirect ({status}) without a usable Location"
                        ))
                    })?;
                url = url.join(location).map_err(|e| {
                    FetchError::Upstream(format!("redirect to an invalid URL: {e}"))
                })?;
                redirects += 1;
                continue;
            }
            if !status.is_success() {
                return Err(FetchError::Upstream(format!(
                    "the image server answered {status}"
                )));
            }
            return self.read_body(response).await;
        }
    }

    /// Scheme and IP-literal checks; the client does not resolve IP literals, so the resolver never sees
    /// them and they are checked here.
    fn check_url(&self, url: &Url) -> Result<(), FetchError> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(FetchError::InvalidUrl(format!(
                "only http and https URLs can be fetched, not {}",
                url.scheme()
            )));
        }
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| FetchError::InvalidUrl(format!("URL has no host: {url}")))?;
        // The URL parser has already normalised numeric forms such as `http://2130706433/` to dotted quads.
        if let Ok(ip) = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            self.policy.check(host, ip)?;
        }
        Ok(())
    }

    async fn read_body(&self, mut response: reqwest::Response) -> Result<Bytes, FetchError> {
        let limit = self.limits.max_bytes;
        if response
            .content_length()
            .is_some_and(|len| len > limit as u64)
        {
            return Err(FetchError::TooLarge { limit });
        }
        let mut body = BytesMut::new();
        // Content-Length can lie or be absent, so the limit holds on what actually arrives.
        while let Some(chunk) = response.chunk().await.map_err(classify)? {
            if body.len() + chunk.len() > limit {
                return Err(FetchError::TooLarge { limit });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    }
}

/// Finds our own refusal inside the client's error chain, or says what went wrong in words.
fn classify(error: reqwest::Error) -> FetchError {
    let mut source: Option<&(dyn StdError + 'static)> = Some(&error);
    let mut root = error.to_string();
    while let Some(e) = source {
        if let Some(fetch) = e.downcast_ref::<FetchError>() {
            return fetch.clone();
        }
        if let Some(refused) = e.downcast_ref::<Refused>() {
            return FetchError::Refused(refused.clone());
        }
        root = e.to_string();
        source = e.source();
    }
    if error.is_timeout() {
        FetchError::Timeout
    } else if error.is_connect() {
        FetchError::Upstream(format!("could not connect to the image server: {root}"))
    } else {
        FetchError::Upstream(format!("error fetching the image: {root}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(policy: &Policy, ip: &str) -> bool {
        policy.check("h", ip.parse().unwrap()).is_err()
    }

    #[test]
    fn non_public_addresses_are_refused() {
        let policy = Policy::default();
        for ip in [
            "127.0.0.1",
            "127.8.9.10",
            "10.0.0.1",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "fc00::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a00:1",
        ] {
            assert!(refused(&policy, ip), "{ip} should be refused");
        }
        for ip in [
            "93.184.216.34",
            "8.8.8.8",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(!refused(&policy, ip), "{ip} should be allowed");
        }
    }

    #[test]
    fn allow_list_exempts_networks_and_hosts() {
        let allow =
            AllowList::parse(["10.1.0.0/16", "127.0.0.1", "images.internal", "*.svc.local"])
                .unwrap();
        let policy = Policy::new(allow);
        assert!(!refused(&policy, "10.1.2.3"));
        assert!(refused(&policy, "10.2.0.1"));
        assert!(!refused(&policy, "127.0.0.1"));
        assert!(refused(&policy, "127.0.0.2"));
        let loopback = "127.0.0.9".parse().unwrap();
        assert!(policy.check("images.internal", loopback).is_ok());
        assert!(policy.check("IMAGES.internal.", loopback).is_ok());
        assert!(policy.check("a.svc.local", loopback).is_ok());
        assert!(policy.check("svc.local.evil", loopback).is_err());
        assert!(AllowList::parse(["not a host!"]).is_err());
        assert!(AllowList::parse(["", " "]).unwrap().is_empty());
    }

    #[test]
    fn resolver_keeps_only_allowed_addresses() {
        let policy = Policy::default();
        let public: SocketAddr = "93.184.216.34:0".parse().unwrap();
        let private: SocketAddr = "10.0.0.1:0".parse().unwrap();
        // A rebinding answer mixing public and private addresses connects only to the public one.
        assert_eq!(
            filter_resolved(&policy, "h", vec![private, public]).unwrap(),
            vec![public]
        );
        assert!(matches!(
            filter_resolved(&policy, "h", vec![private]),
            Err(FetchError::Refused(_))
        ));
        assert!(matches!(
            filter_resolved(&policy, "h", vec![]),
            Err(FetchError::Upstream(_))
        ));
    }
}
