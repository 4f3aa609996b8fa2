//! Asking the processor for memory ahead of its use.

/// Asks the processor to bring the cache line of `value` into the cache;
/// a hint that changes no value. For loops over a table too large for the
/// cache whose places are known some steps ahead.
#[inline(always)]
#[allow(unsafe_code)]
pub(crate) fn prefetch<T>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch never faults and reads nothing the program can
    // observe; the pointer comes from a reference, so it is valid anyway.
    unsafe {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        _mm_prefetch::<_MM_HINT_T0>(std::ptr::from_ref(value).cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}
