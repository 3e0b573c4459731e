//! Crash points for the fault tests. In a debug build, `TOKEND_CRASH_AT=<point>` aborts the
//! process at that point of a write, as `kill -9` would: no unwinding, no flush, the
//! transaction left open. Release builds compile the check away.

/// Aborts here if this debug build was told to.
#[inline]
pub fn crash_point(point: &str) {
    #[cfg(debug_assertions)]
    {
        static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
        if AT
            .get_or_init(|| std::env::var("TOKEND_CRASH_AT").ok())
            .as_deref()
            == Some(point)
        {
            eprintln!("tokend: crash point {point}: aborting");
            std::process::abort();
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = point;
}
