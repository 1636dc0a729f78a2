//! Fuzz targets of everything the gateway parses from a client, on the stable toolchain with bolero's random
//! engine: image bytes through decode and preprocess with the pixel limit on; predict bodies, JSON and multipart;
//! and image URLs through the address policy, checked against an independent table of the address ranges the
//! gateway must never fetch from. Valid inputs (the seeds) are mutated byte by byte: overwritten, inserted,
//! deleted, cut and spliced. Nothing may panic, and what is accepted must keep the limits.
//!
//! `cargo test` runs each target for a moment. For a long run (ten minutes each, one after another):
//!
//!     BOLERO_RANDOM_TEST_TIME_MS=600000 cargo test -p gateway --test fuzz -- --nocapture --test-threads 1
//!
//! A failure prints the `BOLERO_RANDOM_SEED` that reproduces it; each crash found becomes a regression test.

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use bolero::check;
use gateway::decode::{DecodeError, decode};
use gateway::fetch::{AllowList, FetchLimits, Fetcher, Policy, non_public_reason};
use gateway::predict::ImageSource;
use gateway::preprocess::{Recipe, letterbox, preprocess};
use gateway::request::parse_input;
use ipnet::IpNet;

/// Each target's run under plain `cargo test`, unless BOLERO_RANDOM_TEST_TIME_MS says otherwise.
const CI_TIME: Duration = Duration::from_secs(3);
/// The pixel limit of the image target: small, so mutated sizes cross it often.
const MAX_PIXELS: u64 = 64 * 64;
/// The byte limit and image count of the request target.
const MAX_BYTES: usize = 2048;
const MAX_IMAGES: usize = 4;
const BOUNDARY: &str = "fuzz-boundary-7d3a";

/// How a seed is changed: which seed, byte edits (position, operation, value), an optional cut, an optional splice
/// of another seed's tail. Inserting and deleting matter for text: overwriting alone never moves a delimiter.
type Mutation = (u8, Vec<(u16, u8, u8)>, Option<u16>, Option<(u8, u16)>);

fn mutate(seeds: &[Vec<u8>], (pick, edits, cut, splice): &Mutation) -> Vec<u8> {
    let mut bytes = seeds[usize::from(*pick) % seeds.len()].clone();
    for &(at, op, value) in edits {
        let i = usize::from(at) % (bytes.len() + 1);
        match op % 3 {
            0 if i < bytes.len() => bytes[i] = value,
            1 => bytes.insert(i, value),
            2 if i < bytes.len() => {
                bytes.remove(i);
            }
            _ => {}
        }
    }
    if let Some(cut) = cut {
        bytes.truncate(usize::from(*cut) % (bytes.len() + 1));
    }
    if let Some((other, from)) = splice {
        let other = &seeds[usize::from(*other) % seeds.len()];
        let from = usize::from(*from) % (other.len() + 1);
        bytes.extend_from_slice(&other[from..]);
    }
    bytes
}

/// Inputs run and accepted by the stage under test: the second shows how deep the mutations reach.
#[derive(Default)]
struct Counts {
    runs: AtomicU64,
    accepted: AtomicU64,
}

impl Counts {
    fn run(&self, accepted: bool) {
        self.runs.fetch_add(1, Ordering::Relaxed);
        if accepted {
            self.accepted.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn report(&self, name: &str, what: &str) {
        let runs = self.runs.load(Ordering::Relaxed);
        let accepted = self.accepted.load(Ordering::Relaxed);
        println!("fuzz target {name}: {runs} inputs, {accepted} {what}");
        assert!(
            accepted > 0,
            "no mutated input got through: the seeds or the mutations are broken"
        );
    }
}

/// Small images in every format the gateway reads, an image over the pixel limit and one at it.
fn seed_images() -> Vec<Vec<u8>> {
    use image::{DynamicImage, ImageFormat, Rgb, RgbImage, Rgba, RgbaImage};
    let encoded = |image: &DynamicImage, format| {
        let mut out = std::io::Cursor::new(Vec::new());
        image.write_to(&mut out, format).expect("encode");
        out.into_inner()
    };
    let rgb = DynamicImage::from(RgbImage::from_fn(7, 5, |x, y| {
        Rgb([x as u8 * 30, y as u8 * 50, 128])
    }));
    let rgba = DynamicImage::from(RgbaImage::from_fn(5, 7, |x, y| {
        Rgba([x as u8 * 50, y as u8 * 30, 7, 200])
    }));
    let mut seeds: Vec<Vec<u8>> = [
        ImageFormat::Png,
        ImageFormat::Jpeg,
        ImageFormat::Gif,
        ImageFormat::Bmp,
        ImageFormat::WebP,
    ]
    .into_iter()
    .map(|format| encoded(&rgb, format))
    .collect();
    seeds.push(encoded(&rgba, ImageFormat::Png));
    seeds.push(common::png_header(100_000, 100_000));
    seeds.push(common::png_header(64, 64));
    seeds
}

/// Decodes with the pixel limit, then runs both recipes: what decodes must be within the limit, and every
/// recipe must give exactly the model's input size.
fn decode_and_preprocess(bytes: &[u8]) -> bool {
    match decode(bytes, MAX_PIXELS) {
        Ok(image) => {
            let (w, h) = image.dimensions();
            assert!(w >= 1 && h >= 1, "an empty image decoded");
            assert!(
                u64::from(w) * u64::from(h) <= MAX_PIXELS,
                "{w}x{h} decoded over the limit"
            );
            for recipe in [Recipe::CenterCrop { fraction: 0.875 }, Recipe::Resize] {
                let pixels = preprocess(&image, recipe, 6, 5).expect("preprocess");
                assert_eq!(pixels.len(), 6 * 5 * 3);
            }
            let (pixels, placed) = letterbox(&image, 8, 8, 114).expect("letterbox");
            assert_eq!(pixels.len(), 8 * 8 * 3);
            let corner = placed.to_original([0.0, 0.0, 8.0, 8.0], w, h);
            assert!(corner.iter().all(|v| v.is_finite()), "{corner:?}");
            true
        }
        Err(DecodeError::TooManyPixels { .. }) => false,
        Err(_) => false,
    }
}

#[test]
fn fuzz_image_decode_and_preprocess() {
    let seeds = seed_images();
    let counts = Counts::default();
    check!()
        .with_type::<Mutation>()
        .with_test_time(CI_TIME)
        .for_each(|mutation| counts.run(decode_and_preprocess(&mutate(&seeds, mutation))));
    counts.report("image", "decoded and preprocessed");
}

/// Predict bodies of every form: JSON with a URL, base64, a list, options; multipart with files, a URL, options.
fn seed_bodies() -> Vec<(bool, Vec<u8>)> {
    let json = |s: &str| (false, s.as_bytes().to_vec());
    let part = |name: &str, file: Option<&str>, data: &[u8]| {
        let disposition = match file {
            Some(file) => format!("form-data; name=\"{name}\"; filename=\"{file}\""),
            None => format!("form-data; name=\"{name}\""),
        };
        [
            format!("--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n").as_bytes(),
            data,
            b"\r\n",
        ]
        .concat()
    };
    let form = |parts: Vec<Vec<u8>>| {
        let mut body = parts.concat();
        body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
        (true, body)
    };
    vec![
        json(r#"{"url": "http://example.com/cat.jpg"}"#),
        json(r#"{"image": "iVBORw0KGgoAAAANSUhEUg==", "top_k": 3, "model": "m", "version": "2"}"#),
        json(r#"{"image": "data:image/png;base64,iVBORw0KGgo", "min_score": 0.5, "version": 1}"#),
        json(
            r#"{"images": [{"url": "https://example.com/a.png"}, {"image": "AAEC"}, {"image": "@@"}], "top_k": 1}"#,
        ),
        form(vec![part("image", Some("a.png"), b"\x89PNG\r\n\x1a\nabc")]),
        form(vec![
            part("image", Some("a.jpg"), b"\xff\xd8\xff\xe0abc"),
            part("image", Some("b.jpg"), b"\xff\xd8\xff\xe0def"),
            part("top_k", None, b"2"),
            part("model", None, b"m"),
            part("version", None, b"3"),
        ]),
        form(vec![
            part("url", None, b"http://example.com/x.png"),
            part("min_score", None, b"0.25"),
        ]),
    ]
}

/// Parses a body as the route does: whatever is accepted keeps the byte and image limits.
fn parse(runtime: &tokio::runtime::Runtime, multipart: bool, body: Vec<u8>) -> bool {
    let content_type = if multipart {
        format!("multipart/form-data; boundary={BOUNDARY}")
    } else {
        "application/json".to_owned()
    };
    let request = Request::post("/predict")
        .header("content-type", content_type)
        .body(Body::from(body))
        .expect("request");
    let Ok(input) = runtime.block_on(parse_input(request, MAX_BYTES, MAX_IMAGES)) else {
        return false;
    };
    assert!(
        (1..=MAX_IMAGES).contains(&input.images.len()),
        "{} images accepted",
        input.images.len()
    );
    assert!(input.batch || input.images.len() == 1);
    for image in input.images.iter().flatten() {
        if let ImageSource::Bytes(bytes) = image {
            assert!(
                !bytes.is_empty() && bytes.len() <= MAX_BYTES,
                "{} bytes",
                bytes.len()
            );
        }
    }
    // `top_k` is not judged here: its range depends on the model's class count, checked once the model is
    // known (the fuzzer's `{"images": ..., "top_k": 0}` is the regression test in tests/batch.rs).
    if let Some(version) = &input.version {
        assert!(
            !version.is_empty() && version.bytes().all(|b| b.is_ascii_digit()),
            "version {version:?}"
        );
    }
    true
}

#[test]
fn fuzz_predict_bodies() {
    let seeds = seed_bodies();
    let bodies: Vec<Vec<u8>> = seeds.iter().map(|(_, body)| body.clone()).collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let counts = Counts::default();
    check!()
        .with_type::<(Mutation, bool)>()
        .with_test_time(CI_TIME)
        .for_each(|(mutation, flip)| {
            // Mostly as the seed was sent; sometimes a JSON body as multipart and the other way round.
            let multipart = seeds[usize::from(mutation.0) % seeds.len()].0 ^ flip;
            counts.run(parse(&runtime, multipart, mutate(&bodies, mutation)));
        });
    counts.report("predict-body", "parsed");
}

/// Every range the gateway must refuse, written from the address registries rather than from the gateway's
/// code: a second opinion to check the policy against.
fn never_fetched() -> Vec<IpNet> {
    [
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "224.0.0.0/4",
        "240.0.0.0/4",
        "::/128",
        "::1/128",
        "fc00::/7",
        "fe80::/10",
        "fec0::/10",
        "ff00::/8",
    ]
    .iter()
    .map(|net| net.parse().expect("CIDR"))
    .collect()
}

/// The IPv4 address an IPv6 one reaches, in the forms that embed one: mapped, NAT64 and the old compatible form.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let low = Ipv4Addr::from_bits(ip.to_bits() as u32);
    let mapped = s[..6] == [0, 0, 0, 0, 0, 0xffff];
    let nat64 = s[..6] == [0x64, 0xff9b, 0, 0, 0, 0];
    let compatible = s[..6] == [0; 6] && !ip.is_loopback() && !ip.is_unspecified();
    (mapped || nat64 || compatible).then_some(low)
}

fn must_refuse(ip: IpAddr, table: &[IpNet]) -> bool {
    let listed = |ip: IpAddr| table.iter().any(|net| net.contains(&ip));
    match ip {
        IpAddr::V4(_) => listed(ip),
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => listed(IpAddr::V4(v4)),
            None => listed(ip),
        },
    }
}

/// URLs in the forms attackers use to reach inside: numeric hosts, IPv6 with embedded IPv4, odd schemes.
fn seed_urls() -> Vec<Vec<u8>> {
    [
        "http://example.com/cat.jpg",
        "https://93.184.216.34:8443/a.png?x=1#f",
        "http://127.0.0.1/",
        "http://2130706433/",
        "http://0x7f.1/",
        "http://017700000001/",
        "http://[::ffff:169.254.169.254]/latest",
        "http://[64:ff9b::a00:1]/",
        "http://[::10.0.0.1]/",
        "http://[fe80::1%25eth0]/",
        "http://[2606:4700::1111]/",
        "http://user:pass@10.1.2.3:80/",
        "file:///etc/passwd",
        "gopher://127.0.0.1:70/",
        "http://metadata.google.internal/",
        "http://0/",
        "http://100.100.100.200/",
    ]
    .iter()
    .map(|url| url.as_bytes().to_vec())
    .collect()
}

#[test]
fn fuzz_urls_through_the_address_policy() {
    let seeds = seed_urls();
    let table = never_fetched();
    // The fetcher's HTTP client needs a TLS provider installed; an error means one is already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let fetcher = Fetcher::new(
        Policy::new(AllowList::default()),
        FetchLimits {
            max_bytes: 1,
            max_redirects: 0,
            connect_timeout: Duration::from_secs(1),
            total_timeout: Duration::from_secs(1),
        },
    )
    .expect("fetcher");
    // Only read here, and a panic fails the whole test: nothing half-changed is seen after one.
    let fetcher = std::panic::AssertUnwindSafe(fetcher);
    let counts = Counts::default();
    check!()
        .with_type::<Mutation>()
        .with_test_time(CI_TIME)
        .for_each(|mutation| {
            let text = String::from_utf8_lossy(&mutate(&seeds, mutation)).into_owned();
            let Ok(url) = fetcher.admit(&text) else {
                counts.run(false);
                return;
            };
            assert!(matches!(url.scheme(), "http" | "https"), "{text} -> {url}");
            let host = url.host_str().unwrap_or_default();
            assert!(!host.is_empty(), "admitted without a host: {text}");
            // The parser writes IPv6 hosts in brackets and every numeric IPv4 form as a dotted quad.
            if let Ok(ip) = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
            {
                assert!(!must_refuse(ip, &table), "{text} -> {url}: {ip} admitted");
            }
            counts.run(true);
        });
    counts.report("url", "admitted");
}

/// Prefixes around which random addresses are drawn: the table's, the IPv6 forms that embed IPv4, and public ones.
fn address_prefixes() -> Vec<IpNet> {
    let mut prefixes = never_fetched();
    for extra in [
        "::ffff:0:0/96",
        "64:ff9b::/96",
        "::/96",
        "0.0.0.0/0",
        "::/0",
        "2000::/3",
        "100.0.0.0/8",
        "172.0.0.0/8",
        "192.0.0.0/8",
        "fe00::/8",
    ] {
        prefixes.push(extra.parse().expect("CIDR"));
    }
    prefixes
}

#[test]
fn fuzz_addresses_against_the_registry_table() {
    let table = never_fetched();
    let prefixes = address_prefixes();
    let policy = Policy::new(AllowList::default());
    let counts = Counts::default();
    check!()
        .with_type::<(u8, u128)>()
        .with_test_time(CI_TIME)
        .for_each(|(pick, bits)| {
            // An address inside one of the prefixes: random host bits under the prefix's network bits.
            let ip = match prefixes[usize::from(*pick) % prefixes.len()] {
                IpNet::V4(net) => {
                    let host = net.hostmask().to_bits() & (*bits as u32);
                    IpAddr::V4(Ipv4Addr::from_bits(net.network().to_bits() | host))
                }
                IpNet::V6(net) => {
                    let host = net.hostmask().to_bits() & bits;
                    IpAddr::V6(Ipv6Addr::from_bits(net.network().to_bits() | host))
                }
            };
            let refused = policy.check("host", ip).is_err();
            assert_eq!(
                refused,
                must_refuse(ip, &table),
                "{ip}: the policy says {:?}",
                non_public_reason(ip)
            );
            counts.run(!refused);
        });
    counts.report("address", "allowed");
}

#[test]
fn the_seeds_reach_the_code_under_test() {
    let images = seed_images();
    assert!(images[..6].iter().all(|i| decode_and_preprocess(i)));
    assert!(matches!(
        decode(&images[6], MAX_PIXELS),
        Err(DecodeError::TooManyPixels { .. })
    ));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    for (multipart, body) in seed_bodies() {
        assert!(
            parse(&runtime, multipart, body.clone()),
            "{}",
            String::from_utf8_lossy(&body)
        );
    }
}
