//! Access control, off unless `--api-keys-file` is given: every route but the page, the probes, `/metrics` and
//! `/openapi.json` needs `Authorization: Bearer KEY`, and each key has a rate of its own. The file is read again
//! when it changes and on SIGHUP; a file that no longer parses leaves the keys in use as they were.

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use subtle::{ConditionallySelectable, ConstantTimeEq};

use crate::AppState;
use crate::error::ApiError;

/// Routes anyone may call: the page must load before its user can type a key, and probes and scrapers carry none.
const OPEN_ROUTES: &[&str] = &[
    "/",
    "/static/app.js",
    "/static/style.css",
    "/healthz",
    "/readyz",
    "/metrics",
    "/openapi.json",
];

/// Whether the route `path` (as routed, e.g. `/healthz`) is open to requests without a key.
pub fn is_open(path: &str) -> bool {
    OPEN_ROUTES.contains(&path)
}

/// Shortest key accepted: about 96 random bits in base64, what `openssl rand -base64 12` prints.
pub const MIN_KEY_LEN: usize = 16;

/// Why a key file cannot be used. Never carries a key's text.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The file cannot be read.
    #[error("cannot read the API key file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A line is not `NAME KEY RATE BURST`.
    #[error("{path}, line {line}: {message}")]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong, naming the key by its name only.
        message: String,
    },
}

/// The name of the key a request was let in with, in the response extensions for the request's log and metrics.
#[derive(Debug, Clone)]
pub struct KeyName(pub Arc<str>);

/// One key of the file.
struct Key {
    name: Arc<str>,
    secret: Box<[u8]>,
    rate: f64,
    burst: u32,
    limiter: Arc<DefaultDirectRateLimiter>,
}

/// The keys read from the file at one time.
#[derive(Default)]
struct KeyTable {
    keys: Vec<Key>,
}

/// The API keys of `--api-keys-file`, swapped whole when the file changes.
pub struct ApiKeys {
    path: PathBuf,
    table: RwLock<Arc<KeyTable>>,
    /// The bytes the table was parsed from, to tell a change from a touch.
    source: Mutex<Option<Vec<u8>>>,
    clock: DefaultClock,
}

impl ApiKeys {
    /// Reads `path`; refuses a file that does not parse, so a gateway never starts open by mistake.
    pub fn load(path: &Path) -> Result<ApiKeys, KeyFileError> {
        let keys = ApiKeys {
            path: path.to_owned(),
            table: RwLock::new(Arc::default()),
            source: Mutex::new(None),
            clock: DefaultClock::default(),
        };
        keys.reload()?;
        Ok(keys)
    }

    /// Reads the file again if its bytes changed; returns whether the keys changed. A key whose line is unchanged
    /// keeps its rate limiter, so a reload does not refill every bucket.
    pub fn reload(&self) -> Result<bool, KeyFileError> {
        let bytes = std::fs::read(&self.path).map_err(|source| KeyFileError::Read {
            path: self.path.clone(),
            source,
        })?;
        let mut source = self.source.lock().unwrap_or_else(|e| e.into_inner());
        if source.as_deref() == Some(&bytes[..]) {
            return Ok(false);
        }
        let text = String::from_utf8_lossy(&bytes);
        let table = parse(&self.path, &text, &self.table(), &self.clock)?;
        *self.table.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(table);
        *source = Some(bytes);
        Ok(true)
    }

    /// How many keys are in use.
    pub fn len(&self) -> usize {
        self.table().keys.len()
    }

    /// Whether the file holds no key, which refuses every request.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The keys' names, for the log after a reload.
    pub fn names(&self) -> Vec<Arc<str>> {
        self.table().keys.iter().map(|k| k.name.clone()).collect()
    }

    fn table(&self) -> Arc<KeyTable> {
        self.table.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Checks an `Authorization` header value: the key's name if it is a known key within its rate, else
    /// [`ApiError::Unauthorized`] or [`ApiError::RateLimited`].
    pub fn check(&self, authorization: Option<&[u8]>) -> Result<Arc<str>, ApiError> {
        let Some(value) = authorization else {
            return Err(ApiError::Unauthorized(
                "this gateway needs an API key: send `Authorization: Bearer KEY`".into(),
            ));
        };
        let token = match value.split_at_checked(7) {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case(b"bearer ") => token.trim_ascii(),
            _ => {
                return Err(ApiError::Unauthorized(
                    "the Authorization header must be `Bearer KEY`".into(),
                ));
            }
        };
        let table = self.table();
        // Every key is compared, each in constant time, so the time taken says nothing of which key came close.
        let mut found = 0u32;
        for (i, key) in table.keys.iter().enumerate() {
            let candidate = u32::try_from(i + 1).unwrap_or(u32::MAX);
            found = u32::conditional_select(&found, &candidate, key.secret.ct_eq(token));
        }
        let Some(key) = (found as usize)
            .checked_sub(1)
            .and_then(|i| table.keys.get(i))
        else {
            return Err(ApiError::Unauthorized("the API key is not valid".into()));
        };
        match key.limiter.check() {
            Ok(()) => Ok(key.name.clone()),
            Err(not_until) => Err(ApiError::RateLimited {
                name: key.name.to_string(),
                rate: key.rate,
                burst: key.burst,
                retry_after: not_until.wait_time_from(self.clock.now()),
            }),
        }
    }
}

/// Parses the file's text; keys unchanged from `previous` keep their limiters.
fn parse(
    path: &Path,
    text: &str,
    previous: &KeyTable,
    clock: &DefaultClock,
) -> Result<KeyTable, KeyFileError> {
    let mut keys: Vec<Key> = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fail = |message: String| KeyFileError::Line {
            path: path.to_owned(),
            line: index + 1,
            message,
        };
        let fields: Vec<&str> = line.split_ascii_whitespace().collect();
        let [name, secret, rate, burst] = fields[..] else {
            return Err(fail(format!(
                "expected `NAME KEY RATE BURST` (4 fields), found {}",
                fields.len()
            )));
        };
        if name.is_empty()
            || name.len() > 64
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        {
            return Err(fail(format!(
                "the name `{}` must be 1 to 64 letters, digits, `_`, `.` or `-` (it labels logs and metrics)",
                name.escape_default()
            )));
        }
        if secret.len() < MIN_KEY_LEN
            || !secret
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~+/=".contains(&b))
        {
            return Err(fail(format!(
                "the key of `{name}` must be at least {MIN_KEY_LEN} characters of letters, digits and `-._~+/=` \
                 (e.g. the output of `openssl rand -base64 24`)"
            )));
        }
        let rate: f64 = rate
            .parse()
            .ok()
            .filter(|r: &f64| r.is_finite() && *r > 0.0 && *r <= 1e6)
            .ok_or_else(|| {
                fail(format!(
                    "the rate of `{name}` must be a number of requests per second above 0, such as 10 or 0.5, got `{}`",
                    rate.escape_default()
                ))
            })?;
        let burst: u32 = burst.parse().ok().filter(|b| *b >= 1).ok_or_else(|| {
            fail(format!(
                "the burst of `{name}` must be a whole number of requests, at least 1, got `{}`",
                burst.escape_default()
            ))
        })?;
        if keys.iter().any(|k| *k.name == *name) {
            return Err(fail(format!("the name `{name}` is used twice")));
        }
        if keys.iter().any(|k| *k.secret == *secret.as_bytes()) {
            return Err(fail(format!(
                "the key of `{name}` is also another name's key; give each its own"
            )));
        }
        let limiter = previous
            .keys
            .iter()
            .find(|k| {
                *k.name == *name
                    && *k.secret == *secret.as_bytes()
                    && k.rate == rate
                    && k.burst == burst
            })
            .map(|k| k.limiter.clone())
            .unwrap_or_else(|| Arc::new(limiter(rate, burst, clock)));
        keys.push(Key {
            name: name.into(),
            secret: secret.as_bytes().into(),
            rate,
            burst,
            limiter,
        });
    }
    Ok(KeyTable { keys })
}

/// A bucket of `burst` requests refilled at `rate` per second.
fn limiter(rate: f64, burst: u32, clock: &DefaultClock) -> DefaultDirectRateLimiter {
    let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
    // `rate` is checked to be in (0, 1e6], so the period is at least a microsecond.
    let period = Duration::from_secs_f64(1.0 / rate).max(Duration::from_nanos(1));
    let quota = Quota::with_period(period)
        .unwrap_or(Quota::per_second(NonZeroU32::MIN))
        .allow_burst(burst);
    RateLimiter::direct_with_clock(quota, clock.clone())
}

/// Middleware: lets a request through if its route is open or its key is valid and within its rate.
pub async fn require_key(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(keys) = &state.keys else {
        return next.run(request).await;
    };
    let open = request
        .extensions()
        .get::<MatchedPath>()
        .is_some_and(|path| is_open(path.as_str()));
    if open {
        return next.run(request).await;
    }
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    match keys.check(authorization) {
        Ok(name) => {
            tracing::Span::current().record("api_key", &*name);
            let mut response = next.run(request).await;
            response.extensions_mut().insert(KeyName(name));
            response
        }
        Err(error) => {
            // A rate-limited key is known: its refusal is logged and counted under its name too.
            let name = match &error {
                ApiError::RateLimited { name, .. } => Some(Arc::<str>::from(name.as_str())),
                _ => None,
            };
            let mut response = error.into_response();
            if let Some(name) = name {
                tracing::Span::current().record("api_key", &*name);
                response.extensions_mut().insert(KeyName(name));
            }
            response
        }
    }
}

/// Reads the key file again every `every` if it changed (never when zero), and at once on SIGHUP; runs until
/// dropped.
pub async fn watch(keys: Arc<ApiKeys>, metrics: crate::metrics::Metrics, every: Duration) {
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut tick = (!every.is_zero()).then(|| {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick
    });
    loop {
        let polled = async {
            match tick.as_mut() {
                Some(tick) => {
                    tick.tick().await;
                }
                None => std::future::pending().await,
            }
        };
        #[cfg(unix)]
        let signalled = async {
            match hangup.as_mut() {
                Some(signal) => signal.recv().await.is_some(),
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let signalled = std::future::pending::<bool>();
        let hup = tokio::select! {
            () = polled => false,
            got = signalled => got,
        };
        let keys = keys.clone();
        // A blocking read, off the runtime's threads: the file may sit on a slow volume.
        let result =
            tokio::task::spawn_blocking(move || keys.reload().map(|changed| (changed, keys))).await;
        match result {
            Ok(Ok((true, keys))) => {
                metrics.api_keys_loaded(keys.len());
                tracing::info!(keys = keys.len(), names = ?keys.names(), "API keys reloaded");
            }
            Ok(Ok((false, _))) if hup => tracing::info!("SIGHUP: the API key file is unchanged"),
            Ok(Ok((false, _))) => {}
            Ok(Err(e)) => {
                metrics.api_keys_reload_failed();
                tracing::error!(error = %e, "the API key file cannot be used; the keys in use stay as they were");
            }
            Err(e) => tracing::error!(error = %e, "the API key reload task failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(text: &str) -> Result<ApiKeys, KeyFileError> {
        let dir = std::env::temp_dir().join(format!("gateway-keys-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys");
        std::fs::write(&path, text).unwrap();
        ApiKeys::load(&path)
    }

    const ALICE: &str = "alice-0123456789abcdef";
    const BOB: &str = "bob-0123456789abcdefgh";

    #[test]
    fn a_known_key_is_let_in_by_name_and_anything_else_is_not() {
        let keys = keys(&format!(
            "# name key rate burst\n\nalice {ALICE} 100 10\n  bob {BOB} 0.5 1  \n"
        ))
        .unwrap();
        assert_eq!(keys.len(), 2);
        let bearer = |k: &str| format!("Bearer {k}").into_bytes();
        assert_eq!(&*keys.check(Some(&bearer(ALICE))).unwrap(), "alice");
        assert_eq!(&*keys.check(Some(&bearer(BOB))).unwrap(), "bob");
        assert_eq!(
            &*keys
                .check(Some(format!("bearer  {ALICE}").as_bytes()))
                .unwrap(),
            "alice"
        );
        for bad in [
            None,
            Some(b"".to_vec()),
            Some(ALICE.as_bytes().to_vec()),
            Some(format!("Basic {ALICE}").into_bytes()),
            Some(bearer(&ALICE[..ALICE.len() - 1])),
            Some(bearer(&format!("{ALICE}x"))),
            Some(bearer("")),
        ] {
            assert!(
                matches!(keys.check(bad.as_deref()), Err(ApiError::Unauthorized(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_key_over_its_burst_waits_for_its_rate() {
        let keys = keys(&format!("slow {ALICE} 0.5 2\n")).unwrap();
        let header = format!("Bearer {ALICE}").into_bytes();
        assert!(keys.check(Some(&header)).is_ok());
        assert!(keys.check(Some(&header)).is_ok());
        match keys.check(Some(&header)) {
            Err(ApiError::RateLimited {
                name, retry_after, ..
            }) => {
                assert_eq!(name, "slow");
                // One request every two seconds.
                assert!(
                    retry_after > Duration::from_millis(1500)
                        && retry_after <= Duration::from_secs(2),
                    "{retry_after:?}"
                );
            }
            other => panic!("expected a rate limit, got {other:?}"),
        }
    }

    #[test]
    fn bad_lines_are_refused_with_the_line_and_never_the_key() {
        for (text, expected) in [
            (format!("alice {ALICE} 10"), "4 fields"),
            (format!("alice {ALICE} 10 5 extra"), "4 fields"),
            ("alice short 10 5".to_owned(), "at least 16"),
            (format!("al ice {ALICE} 10 5"), "4 fields"),
            (format!("al/ice {ALICE} 10 5"), "name"),
            (format!("alice {ALICE}\u{e9} 10 5"), "key of `alice`"),
            (format!("alice {ALICE} 0 5"), "rate"),
            (format!("alice {ALICE} -1 5"), "rate"),
            (format!("alice {ALICE} NaN 5"), "rate"),
            (format!("alice {ALICE} 10 0"), "burst"),
            (format!("alice {ALICE} 10 2.5"), "burst"),
            (format!("alice {ALICE} 1 1\nalice {BOB} 1 1"), "twice"),
            (
                format!("alice {ALICE} 1 1\nbob {ALICE} 1 1"),
                "another name's key",
            ),
        ] {
            let error = keys(&text)
                .err()
                .unwrap_or_else(|| panic!("accepted {text:?}"));
            let message = error.to_string();
            assert!(message.contains(expected), "{text:?}: {message}");
            assert!(
                !message.contains(ALICE) && !message.contains(BOB),
                "{message}"
            );
        }
        assert!(keys(&format!("alice {ALICE} 1 1\nbob {BOB} 1 1")).is_ok());
    }

    #[test]
    fn a_reload_keeps_the_buckets_of_unchanged_keys_and_a_bad_file_keeps_the_old_keys() {
        let keys = keys(&format!("alice {ALICE} 0.01 1\n")).unwrap();
        let alice = format!("Bearer {ALICE}").into_bytes();
        let bob = format!("Bearer {BOB}").into_bytes();
        assert!(keys.check(Some(&alice)).is_ok());
        assert!(!keys.reload().unwrap(), "nothing changed");

        std::fs::write(&keys.path, format!("alice {ALICE} 0.01 1\nbob {BOB} 1 1\n")).unwrap();
        assert!(keys.reload().unwrap());
        assert!(keys.check(Some(&bob)).is_ok());
        // alice spent her one request before the reload.
        assert!(matches!(
            keys.check(Some(&alice)),
            Err(ApiError::RateLimited { .. })
        ));

        std::fs::write(&keys.path, format!("bob {BOB} 1\n")).unwrap();
        assert!(keys.reload().is_err());
        assert_eq!(
            keys.names().len(),
            2,
            "a bad file must not drop the keys in use"
        );

        std::fs::write(&keys.path, format!("bob {BOB} 1 1\n")).unwrap();
        assert!(keys.reload().unwrap());
        assert!(matches!(
            keys.check(Some(&alice)),
            Err(ApiError::Unauthorized(_))
        ));
    }
}
