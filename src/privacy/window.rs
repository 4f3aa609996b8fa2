//! Budget windows: the period a querying organisation's epsilon covers.

use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time};

use crate::policy::Refresh;

/// One budget window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Stable name: "all" for a budget that never refreshes, "2026-11" for a
    /// calendar month (UTC).
    pub id: String,
    /// When the next window starts, if ever.
    pub next_refresh: Option<OffsetDateTime>,
}

/// The window `now` falls in.
pub fn window(refresh: Refresh, now: OffsetDateTime) -> Window {
    match refresh {
        Refresh::Never => Window {
            id: "all".into(),
            next_refresh: None,
        },
        Refresh::Monthly => {
            let now = now.to_offset(time::UtcOffset::UTC);
            let (year, month) = (now.year(), now.month());
            let (next_year, next_month) = match month {
                Month::December => (year + 1, Month::January),
                m => (year, m.next()),
            };
            let next = Date::from_calendar_date(next_year, next_month, 1)
                .ok()
                .map(|d| PrimitiveDateTime::new(d, Time::MIDNIGHT).assume_utc());
            Window {
                id: format!("{year:04}-{:02}", u8::from(month)),
                next_refresh: next,
            }
        }
    }
}

/// RFC 3339 text of an instant, or "never".
pub fn describe(next: Option<OffsetDateTime>) -> String {
    next.and_then(|t| {
        t.format(&time::format_description::well_known::Rfc3339)
            .ok()
    })
    .unwrap_or_else(|| "never".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn monthly_windows_roll_over_at_midnight_utc() {
        let w = window(Refresh::Monthly, datetime!(2026-11-30 23:59:59 UTC));
        assert_eq!(w.id, "2026-11");
        assert_eq!(w.next_refresh, Some(datetime!(2026-12-01 0:00 UTC)));
        let w = window(Refresh::Monthly, datetime!(2026-12-31 12:00 UTC));
        assert_eq!(w.id, "2026-12");
        assert_eq!(describe(w.next_refresh), "2027-01-01T00:00:00Z");
        // Local offsets count in UTC.
        let w = window(Refresh::Monthly, datetime!(2026-12-01 00:30 +02:00));
        assert_eq!(w.id, "2026-11");
        let w = window(Refresh::Never, datetime!(2026-12-01 00:30 UTC));
        assert_eq!(
            (w.id.as_str(), describe(w.next_refresh).as_str()),
            ("all", "never")
        );
    }
}
