//! 50 load/unload cycles of a version under load: the memory and threads of the process before and after. The
//! only test in its binary, so that nothing else running in the process moves the numbers.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::lifecycle::*;
use oip_proto::GrpcInferenceServiceClient;
use tonic::transport::Channel;

// The server runs inside this test process: it gets the allocator the shipped binary uses, so the memory the
// cycles test measures is the memory a deployed server would hold.
#[global_allocator]
static GLOBAL: Counting = Counting;

/// mimalloc, counting the bytes the program holds: what a leak would show, whatever the allocator keeps cached.
struct Counting;

static LIVE_BYTES: AtomicU64 = AtomicU64::new(0);

unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        unsafe { mimalloc::MiMalloc.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as u64, Ordering::Relaxed);
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(new_size as u64, Ordering::Relaxed);
        LIVE_BYTES.fetch_sub(layout.size() as u64, Ordering::Relaxed);
        unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) }
    }
}

/// Resident set size of this process (the server runs in it).
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("rss");
    pages * 4096
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1048576.0
}

/// Threads of this process whose name starts with `prefix`.
fn threads_named(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("tasks")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with(prefix))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_load_unload_cycles_under_load_leak_neither_memory_nor_versions() {
    let repo = Repo::new("cycles");
    repo.add(MODEL, 1);
    repo.add(MODEL, 2);
    let (server, mut client) = serve(
        &repo,
        &["--model-control-mode", "explicit", "--load-model", MODEL],
    )
    .await;
    let one = r#"{"version_policy": {"specific": {"versions": [1]}}}"#;
    let both = r#"{"version_policy": {"specific": {"versions": [1, 2]}}}"#;
    let stop = Arc::new(AtomicBool::new(false));
    let (tally, tasks) = background_load(&server, MODEL, 2, stop.clone());
    // A few cycles first, so the allocator and the thread pools are at their working size. Both measurements
    // are taken under the same load, one version serving, after the allocator's purge delay (mimalloc keeps
    // freed pages for a second before it returns them, and only while its threads run).
    for _ in 0..3 {
        load(&mut client, MODEL, Some(both)).await.expect("load v2");
        load(&mut client, MODEL, Some(one))
            .await
            .expect("unload v2");
    }
    let settle = async |client: &mut GrpcInferenceServiceClient<Channel>| {
        wait_index(client, Duration::from_secs(10), "version 2 is gone", |i| {
            i.len() == 1 && i[0].1 == "1" && i[0].2 == "READY"
        })
        .await;
        tokio::time::sleep(Duration::from_millis(2500)).await;
        // Requests in flight move both numbers by megabytes from one moment to the next: the median of a
        // second's samples.
        let (mut rss, mut live) = (Vec::new(), Vec::new());
        for _ in 0..11 {
            rss.push(rss_bytes());
            live.push(LIVE_BYTES.load(Ordering::Relaxed));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        rss.sort_unstable();
        live.sort_unstable();
        (rss[5], live[5], threads_named("batcher-"))
    };
    let (rss_start, live_start, threads_start) = settle(&mut client).await;
    let started = Instant::now();
    let cycles = 50;
    let mut served_by_2 = 0;
    let mut rss_middle = 0;
    let mut measuring = Duration::ZERO;
    for cycle in 0..cycles {
        load(&mut client, MODEL, Some(both)).await.expect("load v2");
        if infer(&mut client, MODEL, "").await.expect("infer") == "2" {
            served_by_2 += 1;
        }
        load(&mut client, MODEL, Some(one))
            .await
            .expect("unload v2");
        if cycle + 1 == cycles / 2 {
            let at = Instant::now();
            rss_middle = settle(&mut client).await.0;
            measuring = at.elapsed();
        }
    }
    let elapsed = started.elapsed() - measuring;
    let (rss_end, live_end, threads_end) = settle(&mut client).await;
    finish(&stop, tasks).await;
    let weights = weights_bytes();
    println!(
        "{cycles} load/unload cycles of version 2 in {elapsed:.1?} ({:.0?} each) under a load of {} requests: \
         RSS (median of 11 samples) {:.1} MiB -> {:.1} MiB after {} cycles -> {:.1} MiB ({:+.1} MiB over the second half), \
         heap in use {:.1} MiB -> {:.1} MiB ({:+.1} MiB); one copy of the weights is {:.1} MiB; batcher threads \
         {threads_start} -> {threads_end}",
        elapsed / cycles,
        tally.ok.load(Ordering::SeqCst),
        mib(rss_start),
        mib(rss_middle),
        cycles / 2,
        mib(rss_end),
        mib(rss_end) - mib(rss_middle),
        mib(live_start),
        mib(live_end),
        mib(live_end) - mib(live_start),
        mib(weights),
    );
    assert_eq!(served_by_2, cycles, "version 2 served after every load");
    assert_no_failures(&tally);
    // The resident size may step up once, as the allocator's caches settle to the instances' threads coming and
    // going (by up to about one copy of the weights on some machines); a leak keeps growing. A version leaked per
    // cycle would add 25 copies over the second half.
    assert!(
        rss_end < rss_middle + weights,
        "memory grew by {} bytes over the last {} cycles, more than one copy of the weights ({weights})",
        rss_end as i64 - rss_middle as i64,
        cycles - cycles / 2
    );
    // The exact count: a leaked version would keep its weights in use whatever the allocator returned.
    assert!(
        live_end < live_start + weights,
        "heap in use grew by {} bytes over {cycles} cycles: a version was kept",
        live_end as i64 - live_start as i64
    );
    assert_eq!(
        threads_end, threads_start,
        "every unloaded version's instance threads exited"
    );
    server.stop().await;
}
