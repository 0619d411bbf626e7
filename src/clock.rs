//! The one clock: the time every version, ledger entry and response stamp is taken from.

/// Microseconds since the Unix epoch, UTC.
pub fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}
