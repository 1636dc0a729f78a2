//! Handing freed memory back to the operating system when a model version is loaded or goes.
//!
//! The server's allocator (mimalloc) keeps a thread's freed pages until that thread allocates again, and frees
//! made from another thread wait for the owner too. A version's weights are allocated on an inference thread
//! and freed when its own batcher threads exit, so without a nudge an unloaded version's memory could stay
//! resident for as long as those inference threads had nothing to do; reloads under load would grow the
//! process by up to a copy of the weights each time the timing was unlucky.

/// Returns this thread's free pages and the process-wide arenas' to the operating system now. Costs about as
/// much as a small allocation burst; call it after a load or an unload, never per request. Does nothing
/// useful, and nothing harmful, when mimalloc is not the global allocator (the library's tests).
pub fn release_free_pages() {
    // SAFETY: mi_collect takes no pointers and may be called from any thread at any time.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// [`release_free_pages`] on every thread of `pool`, where the weights were allocated, then on this one.
/// Waits for each pool thread to finish the job it is running.
pub fn release_free_pages_on(pool: &rayon::ThreadPool) {
    pool.broadcast(|_| release_free_pages());
    release_free_pages();
}
