//! Cron schedules in a time zone: parsing (six fields, seconds first, as tokio-cron-scheduler
//! takes them) and the next occurrences after an instant, correct across daylight-saving
//! changes. Pure functions of their inputs; the ticker uses them to arm its timer.
//!
//! Daylight saving, as implemented by croner (Open Cron Pattern Specification) and tested
//! below: a fixed-time schedule (`0 30 2 * * *`) whose time falls in the spring-forward gap
//! runs once, at the first valid time after the gap (03:00); in the autumn overlap it runs
//! once, at the first of the two 02:30s. Interval and wildcard schedules (`0 */15 * * * *`)
//! follow the wall clock: in the gap the missing times do not occur; in the overlap both
//! occurrences of a repeated time run.

use chrono::{DateTime, Duration, LocalResult, SubsecRound, TimeZone, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds};
use croner::Cron;

#[derive(Clone, Debug)]
pub struct Schedule {
    cron: Cron,
    tz: Tz,
}

impl Schedule {
    /// `expr` has six fields (second minute hour day-of-month month day-of-week); `tz` is an
    /// IANA time zone name such as `Europe/Paris`.
    pub fn parse(expr: &str, tz: &str) -> Result<Schedule, String> {
        let tz: Tz = tz.parse().map_err(|_| {
            format!("unknown time zone {tz:?}: use an IANA name such as Europe/Paris or UTC")
        })?;
        let cron = CronParser::builder()
            .seconds(Seconds::Required)
            .dom_and_dow(true)
            .build()
            .parse(expr.trim())
            .map_err(|e| {
                format!("invalid cron expression {expr:?} ({e}): six fields, seconds first, e.g. '0 */5 * * * *'")
            })?;
        Ok(Schedule { cron, tz })
    }

    pub fn time_zone(&self) -> Tz {
        self.tz
    }

    /// The first occurrence strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        // Occurrences are whole seconds; search from the whole second at or before `after`.
        let after_second = after.trunc_subsecs(0);
        let local = after_second.with_timezone(&self.tz);
        // Inside an autumn overlap, starting the search at `after` would skip the second
        // occurrence of a repeated wall-clock time; start before the overlap instead.
        let start = match self.tz.from_local_datetime(&local.naive_local()) {
            LocalResult::Ambiguous(..) => after_second - Duration::hours(3),
            _ => after_second,
        };
        self.cron
            .iter_after(start.with_timezone(&self.tz))
            .map(|d| d.with_timezone(&Utc))
            .find(|d| *d > after)
    }

    /// Occurrences in `(after, until]`, oldest first, at most `max`.
    pub fn between(
        &self,
        after: DateTime<Utc>,
        until: DateTime<Utc>,
        max: usize,
    ) -> Vec<DateTime<Utc>> {
        let mut out = Vec::new();
        let mut cursor = after;
        while out.len() < max {
            match self.next_after(cursor) {
                Some(next) if next <= until => {
                    out.push(next);
                    cursor = next;
                }
                _ => break,
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn next(expr: &str, tz: &str, after: &str) -> String {
        Schedule::parse(expr, tz)
            .unwrap()
            .next_after(utc(after))
            .unwrap()
            .to_rfc3339()
    }

    #[test]
    fn parses_six_fields_and_time_zones_or_says_why_not() {
        assert!(Schedule::parse("0 */5 * * * *", "UTC").is_ok());
        assert!(Schedule::parse("*/1 * * * * *", "Europe/Paris").is_ok());
        let err = Schedule::parse("*/5 * * * *", "UTC").unwrap_err();
        assert!(err.contains("six fields"), "{err}");
        let err = Schedule::parse("0 0 * * * *", "Mars/Olympus").unwrap_err();
        assert!(err.contains("unknown time zone"), "{err}");
    }

    #[test]
    fn occurrences_are_whole_seconds_whatever_the_start() {
        assert_eq!(
            next("* * * * * *", "UTC", "2026-01-01T00:00:00.750Z"),
            "2026-01-01T00:00:01+00:00"
        );
        assert_eq!(
            next("0 */5 * * * *", "UTC", "2026-01-01T00:04:59.999Z"),
            "2026-01-01T00:05:00+00:00"
        );
    }

    #[test]
    fn restricted_day_fields_must_both_match() {
        assert_eq!(
            next("0 0 0 13 * FRI", "UTC", "2026-01-01T00:00:00Z"),
            "2026-02-13T00:00:00+00:00"
        );
    }

    #[test]
    fn every_second_and_every_five_minutes_in_utc() {
        assert_eq!(
            next("* * * * * *", "UTC", "2026-01-01T00:00:00Z"),
            "2026-01-01T00:00:01+00:00"
        );
        assert_eq!(
            next("0 */5 * * * *", "UTC", "2026-01-01T00:02:00Z"),
            "2026-01-01T00:05:00+00:00"
        );
        assert_eq!(
            next("0 */5 * * * *", "UTC", "2026-01-01T00:05:00Z"),
            "2026-01-01T00:10:00+00:00"
        );
    }

    #[test]
    fn local_time_follows_the_zone_in_winter_and_summer() {
        // 09:00 in Paris is 08:00 UTC in winter and 07:00 UTC in summer.
        assert_eq!(
            next("0 0 9 * * *", "Europe/Paris", "2026-01-15T00:00:00Z"),
            "2026-01-15T08:00:00+00:00"
        );
        assert_eq!(
            next("0 0 9 * * *", "Europe/Paris", "2026-07-15T00:00:00Z"),
            "2026-07-15T07:00:00+00:00"
        );
    }

    #[test]
    fn a_fixed_time_in_the_spring_gap_runs_once_right_after_it() {
        // 2026-03-29 in Paris: 02:00 CET jumps to 03:00 CEST (01:00 UTC); 02:30 does not exist.
        let s = Schedule::parse("0 30 2 * * *", "Europe/Paris").unwrap();
        let runs = s.between(utc("2026-03-28T12:00:00Z"), utc("2026-03-30T12:00:00Z"), 10);
        let runs: Vec<String> = runs.iter().map(|d| d.to_rfc3339()).collect();
        assert_eq!(
            runs,
            [
                "2026-03-29T01:00:00+00:00", // 03:00 CEST, the first valid time after the gap
                "2026-03-30T00:30:00+00:00", // 02:30 CEST the next day
            ]
        );
    }

    #[test]
    fn a_fixed_time_in_the_autumn_overlap_runs_once() {
        // 2026-10-25 in Paris: 03:00 CEST goes back to 02:00 CET; 02:30 happens twice.
        let s = Schedule::parse("0 30 2 * * *", "Europe/Paris").unwrap();
        let runs = s.between(utc("2026-10-24T12:00:00Z"), utc("2026-10-26T12:00:00Z"), 10);
        let runs: Vec<String> = runs.iter().map(|d| d.to_rfc3339()).collect();
        assert_eq!(
            runs,
            [
                "2026-10-25T00:30:00+00:00", // 02:30 CEST, the first of the two
                "2026-10-26T01:30:00+00:00", // 02:30 CET the next day
            ]
        );
    }

    #[test]
    fn an_interval_schedule_follows_the_wall_clock_through_both_changes() {
        let s = Schedule::parse("0 30 * * * *", "Europe/Paris").unwrap();
        // Spring: local 02:30 does not exist, so that hour has no run.
        let spring = s.between(utc("2026-03-28T23:59:00Z"), utc("2026-03-29T02:00:00Z"), 10);
        let spring: Vec<String> = spring.iter().map(|d| d.to_rfc3339()).collect();
        assert_eq!(
            spring,
            ["2026-03-29T00:30:00+00:00", "2026-03-29T01:30:00+00:00"]
        );
        // Autumn: local 02:30 happens twice, and both run, an hour apart.
        let autumn = s.between(utc("2026-10-24T23:59:00Z"), utc("2026-10-25T02:00:00Z"), 10);
        let autumn: Vec<String> = autumn.iter().map(|d| d.to_rfc3339()).collect();
        assert_eq!(
            autumn,
            [
                "2026-10-25T00:30:00+00:00", // 02:30 CEST
                "2026-10-25T01:30:00+00:00", // 02:30 CET
            ]
        );
        // Asked from between the two 02:30s, the second one is next.
        assert_eq!(
            s.next_after(utc("2026-10-25T00:45:00Z"))
                .unwrap()
                .to_rfc3339(),
            "2026-10-25T01:30:00+00:00"
        );
    }

    #[test]
    fn catch_up_is_bounded() {
        let s = Schedule::parse("* * * * * *", "UTC").unwrap();
        let missed = s.between(
            utc("2026-01-01T00:00:00Z"),
            utc("2026-01-01T01:00:00Z"),
            100,
        );
        assert_eq!(missed.len(), 100);
        assert_eq!(missed[0].to_rfc3339(), "2026-01-01T00:00:01+00:00");
    }
}
