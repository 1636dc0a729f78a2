//! One HTTP/2 connection per model-server replica, and the choice of replica for each call: the less busy
//! of two picked at random, skipping replicas ejected after consecutive failures.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint as TonicEndpoint};

/// When to take a replica out of rotation.
#[derive(Debug, Clone, Copy)]
pub struct Ejection {
    /// Consecutive connection failures or UNAVAILABLE answers that eject a replica.
    pub after_failures: u32,
    /// How long an ejected replica gets no traffic.
    pub cool_down: Duration,
}

/// One model-server replica and its connection.
#[derive(Debug)]
pub struct Endpoint {
    addr: SocketAddr,
    channel: Channel,
    in_flight: AtomicUsize,
    consecutive_failures: AtomicU32,
    ejected_until: Mutex<Option<Instant>>,
}

impl Endpoint {
    /// The replica's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The replica's connection; cloning it is cheap and keeps it open while a call uses it.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// Counts a call as in flight on this replica until the guard is dropped.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    fn is_ejected(&self, now: Instant) -> bool {
        lock(&self.ejected_until).is_some_and(|until| now < until)
    }
}

/// A call in flight on one replica (see [`Endpoint::start`]).
pub struct InFlight(Arc<Endpoint>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a test or an operator can see of one replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointStatus {
    /// The replica's address.
    pub addr: SocketAddr,
    /// Calls in flight on it.
    pub in_flight: usize,
    /// Whether it is sitting out a cool-down.
    pub ejected: bool,
}

/// The replicas currently known, kept up to date by discovery.
pub struct Pool {
    endpoints: RwLock<Vec<Arc<Endpoint>>>,
    ejection: Ejection,
    connect: Connect,
    ejections: AtomicU64,
    rng: AtomicU64,
    changed: watch::Sender<usize>,
}

/// Makes the channel of a new replica.
pub type Connect =
    Arc<dyn Fn(SocketAddr) -> Result<Channel, tonic::transport::Error> + Send + Sync>;

/// Lazily connecting channels, over TLS when `tls` is given: the first call connects, and a lost connection
/// is re-made on the next call.
pub fn connector(tls: Option<ClientTlsConfig>) -> Connect {
    Arc::new(move |addr| {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut endpoint = TonicEndpoint::from_shared(format!("{scheme}://{addr}"))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            // A replica that vanishes without closing its connections is noticed within seconds.
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        if let Some(tls) = &tls {
            endpoint = endpoint.tls_config(tls.clone())?;
        }
        Ok(endpoint.connect_lazy())
    })
}

impl Pool {
    /// An empty pool; `connect` makes the channel of each new replica.
    pub fn new(ejection: Ejection, connect: Connect) -> Self {
        let seed = std::hash::BuildHasher::hash_one(&std::hash::RandomState::new(), Instant::now());
        Pool {
            endpoints: RwLock::new(Vec::new()),
            ejection,
            connect,
            ejections: AtomicU64::new(0),
            rng: AtomicU64::new(seed | 1),
            changed: watch::channel(0).0,
        }
    }

    /// Makes the pool hold exactly `addresses`: new replicas are connected, gone ones are dropped from
    /// the rotation while calls already on them finish (each call holds its own handle).
    pub fn update(&self, addresses: &BTreeSet<SocketAddr>) {
        let mut endpoints = self.endpoints.write().unwrap_or_else(|p| p.into_inner());
        let before: BTreeSet<SocketAddr> = endpoints.iter().map(|e| e.addr).collect();
        if &before == addresses {
            return;
        }
        endpoints.retain(|e| addresses.contains(&e.addr));
        for &addr in addresses.difference(&before) {
            let channel = match (self.connect)(addr) {
                Ok(channel) => channel,
                Err(e) => {
                    tracing::warn!(endpoint = %addr, error = %e, "cannot make a channel to the replica; skipped");
                    continue;
                }
            };
            endpoints.push(Arc::new(Endpoint {
                addr,
                channel,
                in_flight: AtomicUsize::new(0),
                consecutive_failures: AtomicU32::new(0),
                ejected_until: Mutex::new(None),
            }));
        }
        let added: Vec<_> = addresses.difference(&before).collect();
        let removed: Vec<_> = before.difference(addresses).collect();
        tracing::info!(
            ?added,
            ?removed,
            replicas = endpoints.len(),
            "model-server replicas changed"
        );
        self.changed.send_replace(endpoints.len());
    }

    /// Chooses a replica for the next attempt, avoiding those in `tried`: the less loaded of two random
    /// healthy ones. When every untried replica is ejected, ejection is ignored (a guess beats certain
    /// failure); when every replica was tried, they are all candidates again.
    pub fn pick(&self, tried: &[SocketAddr]) -> Option<Arc<Endpoint>> {
        let endpoints = self.endpoints.read().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let untried = |e: &&Arc<Endpoint>| !tried.contains(&e.addr);
        let mut candidates: Vec<&Arc<Endpoint>> = endpoints
            .iter()
            .filter(untried)
            .filter(|e| !e.is_ejected(now))
            .collect();
        if candidates.is_empty() {
            candidates = endpoints.iter().filter(untried).collect();
        }
        if candidates.is_empty() {
            candidates = endpoints.iter().collect();
        }
        match candidates.len() {
            0 => None,
            1 => Some(candidates[0].clone()),
            n => {
                let r = self.random();
                let a = (r % n as u64) as usize;
                // A second index different from the first.
                let b = (a + 1 + ((r >> 32) % (n as u64 - 1)) as usize) % n;
                let (a, b) = (candidates[a], candidates[b]);
                let load = |e: &Endpoint| e.in_flight.load(Ordering::Relaxed);
                Some(if load(b) < load(a) { b } else { a }.clone())
            }
        }
    }

    /// The replica answered (whatever it answered): it is alive.
    pub fn succeeded(&self, endpoint: &Endpoint) {
        endpoint.consecutive_failures.store(0, Ordering::Relaxed);
    }

    /// The replica could not be reached or said UNAVAILABLE; enough of these in a row eject it.
    pub fn failed(&self, endpoint: &Endpoint) {
        let failures = endpoint
            .consecutive_failures
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        if failures < self.ejection.after_failures {
            return;
        }
        let mut until = lock(&endpoint.ejected_until);
        let now = Instant::now();
        if until.is_some_and(|u| now < u) {
            return;
        }
        *until = Some(now + self.ejection.cool_down);
        // Back on probation after the cool-down: one more failure ejects it again.
        endpoint.consecutive_failures.store(
            self.ejection.after_failures.saturating_sub(1),
            Ordering::Relaxed,
        );
        self.ejections.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(endpoint = %endpoint.addr, failures, cool_down_ms = self.ejection.cool_down.as_millis() as u64, "model-server replica ejected");
    }

    /// Waits until at least one replica is known or `within` passes; for calls arriving before the
    /// first resolution.
    pub async fn wait_for_endpoints(&self, within: Duration) {
        // Subscribed before looking, so an update between the two cannot be missed.
        let mut rx = self.changed.subscribe();
        let known = |n: &usize| *n > 0;
        if known(&rx.borrow_and_update()) {
            return;
        }
        let _ = tokio::time::timeout(within, rx.wait_for(known)).await;
    }

    /// Every replica with its load and state.
    pub fn status(&self) -> Vec<EndpointStatus> {
        let now = Instant::now();
        self.endpoints
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|e| EndpointStatus {
                addr: e.addr,
                in_flight: e.in_flight.load(Ordering::Relaxed),
                ejected: e.is_ejected(now),
            })
            .collect()
    }

    /// How many times a replica was ejected since start.
    pub fn ejections(&self) -> u64 {
        self.ejections.load(Ordering::Relaxed)
    }

    /// A uniformly distributed u64 (xorshift64*); good enough to spread load and jitter back-off.
    pub fn random(&self) -> u64 {
        let mut x = self.rng.load(Ordering::Relaxed);
        loop {
            let mut next = x;
            next ^= next >> 12;
            next ^= next << 25;
            next ^= next >> 27;
            match self
                .rng
                .compare_exchange_weak(x, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return next.wrapping_mul(0x2545_F491_4F6C_DD1D),
                Err(current) => x = current,
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The guarded values are plain timestamps: a panicking holder cannot leave them half-written.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn pool(ports: &[u16]) -> Pool {
        let pool = Pool::new(
            Ejection {
                after_failures: 2,
                cool_down: Duration::from_secs(60),
            },
            connector(None),
        );
        pool.update(&ports.iter().map(|&p| addr(p)).collect());
        pool
    }

    #[tokio::test]
    async fn a_call_before_the_first_resolution_waits_for_it() {
        let pool = Arc::new(pool(&[]));
        let later = pool.clone();
        tokio::spawn(async move { later.update(&[addr(1)].into()) });
        pool.wait_for_endpoints(Duration::from_secs(60)).await;
        assert_eq!(pool.pick(&[]).unwrap().addr(), addr(1));
    }

    #[tokio::test]
    async fn update_adds_and_removes_replicas() {
        let pool = pool(&[1, 2]);
        pool.update(&[addr(2), addr(3)].into());
        let mut addrs: Vec<_> = pool.status().iter().map(|s| s.addr).collect();
        addrs.sort();
        assert_eq!(addrs, [addr(2), addr(3)]);
    }

    #[tokio::test]
    async fn pick_prefers_the_less_loaded_of_two() {
        let pool = pool(&[1, 2]);
        let busy = pool.pick(&[addr(2)]).unwrap();
        assert_eq!(busy.addr(), addr(1));
        let _calls = [busy.start(), busy.start()];
        for _ in 0..20 {
            assert_eq!(pool.pick(&[]).unwrap().addr(), addr(2));
        }
    }

    #[tokio::test]
    async fn pick_skips_tried_replicas_until_all_were_tried() {
        let pool = pool(&[1, 2, 3]);
        for _ in 0..20 {
            assert_eq!(pool.pick(&[addr(1), addr(3)]).unwrap().addr(), addr(2));
        }
        assert!(pool.pick(&[addr(1), addr(2), addr(3)]).is_some());
        assert!(
            Pool::new(pool.ejection, connector(None))
                .pick(&[])
                .is_none()
        );
    }

    #[tokio::test]
    async fn consecutive_failures_eject_and_a_success_resets_the_count() {
        let pool = pool(&[1, 2]);
        let one = pool.pick(&[addr(2)]).unwrap();
        pool.failed(&one);
        pool.succeeded(&one);
        pool.failed(&one);
        assert_eq!(pool.ejections(), 0, "failures must be consecutive");
        pool.failed(&one);
        assert_eq!(pool.ejections(), 1);
        for _ in 0..20 {
            assert_eq!(pool.pick(&[]).unwrap().addr(), addr(2));
        }
        // With the other replica already tried, the ejected one is still better than nothing.
        assert_eq!(pool.pick(&[addr(2)]).unwrap().addr(), addr(1));
    }
}
