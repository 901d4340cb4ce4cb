//! Counting what a rekey did, and the lines it prints about it.

use std::time::Duration;

use super::object::{Outcome, Skip};
use crate::store::Transfer;

/// Running totals of one rekey.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub total: u64,
    pub rekeyed: u64,
    pub would_rekey: u64,
    pub current: u64,
    /// Not ours, another mode's, or gone.
    pub other: u64,
    /// S3 Encryption Client objects rekey cannot move (legacy formats, RSA, instruction files).
    pub s3ec_left: u64,
    pub failed: u64,
    pub cost: Transfer,
    /// The part of `cost` spent on objects that were rekeyed: what moving one object costs.
    pub rekeyed_cost: Transfer,
    pub kms_calls: u64,
}

impl Stats {
    pub fn new(total: u64) -> Stats {
        Stats { total, ..Stats::default() }
    }

    pub fn record(&mut self, outcome: &Outcome, cost: Transfer, kms_calls: u64) {
        match outcome {
            Outcome::Rekeyed => self.rekeyed += 1,
            Outcome::WouldRekey => self.would_rekey += 1,
            Outcome::Skipped(Skip::Current) => self.current += 1,
            Outcome::Skipped(Skip::NotOurs | Skip::OtherKind | Skip::Vanished) => self.other += 1,
            Outcome::Skipped(Skip::S3ecLeft(_)) => self.s3ec_left += 1,
            Outcome::Failed(_) => self.failed += 1,
        }
        if let Outcome::Rekeyed = outcome {
            self.rekeyed_cost += cost;
        }
        self.cost += cost;
        self.kms_calls += kms_calls;
    }

    pub fn done(&self) -> u64 {
        self.rekeyed + self.would_rekey + self.current + self.other + self.failed
    }

    pub fn skipped(&self) -> u64 {
        self.current + self.other + self.s3ec_left
    }

    /// `rekey: done D of T objects (S skipped, F failed), R objects/s`
    pub fn progress_line(&self, elapsed: Duration) -> String {
        format!(
            "rekey: done {} of {} objects ({} skipped, {} failed), {} objects/s",
            self.done(),
            self.total,
            self.skipped(),
            self.failed,
            rate(self.done(), elapsed)
        )
    }

    /// The closing lines: what happened to the objects, then what it cost.
    pub fn summary(&self, elapsed: Duration, dry_run: bool) -> Vec<String> {
        let mut skipped = format!(
            "{} skipped ({} already on the new key, {} not s3cryptfs objects of this mode",
            self.skipped(),
            self.current,
            self.other
        );
        if self.s3ec_left > 0 {
            // Each is named on its own line above: they still need the old key.
            skipped.push_str(&format!(", {} S3EC objects rekey cannot move", self.s3ec_left));
        }
        skipped.push(')');
        let what = if dry_run {
            format!("rekey (dry run): {} to rekey, {skipped}, {} would fail", self.would_rekey, self.failed)
        } else {
            format!("rekey: {} rekeyed, {skipped}, {} failed", self.rekeyed, self.failed)
        };
        let mut cost = format!(
            "rekey: {:.1} s; {} store requests besides the listing, {} down, {} up",
            elapsed.as_secs_f64(),
            self.cost.requests,
            human_bytes(self.cost.bytes_down),
            human_bytes(self.cost.bytes_up)
        );
        if self.kms_calls > 0 {
            cost.push_str(&format!(", {} KMS calls", self.kms_calls));
        }
        if self.rekeyed > 0 {
            let n = self.rekeyed as f64;
            cost.push_str(&format!(
                "; per rekeyed object {:.1} requests, {} down, {} up",
                self.rekeyed_cost.requests as f64 / n,
                human_bytes((self.rekeyed_cost.bytes_down as f64 / n) as u64),
                human_bytes((self.rekeyed_cost.bytes_up as f64 / n) as u64)
            ));
        }
        vec![self.progress_line(elapsed), what, cost]
    }
}

fn rate(done: u64, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64();
    if secs <= 0.0 {
        return "0".into();
    }
    let r = done as f64 / secs;
    if r >= 10.0 {
        format!("{r:.0}")
    } else {
        format!("{r:.1}")
    }
}

/// 512 B, 1.5 KiB, 12.0 MiB, …
pub(crate) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_have_the_documented_shape() {
        let mut s = Stats::new(10);
        s.record(&Outcome::Rekeyed, Transfer { requests: 3, bytes_down: 1536, bytes_up: 1024 }, 0);
        s.record(&Outcome::Skipped(Skip::Current), Transfer { requests: 1, bytes_down: 512, bytes_up: 0 }, 0);
        s.record(&Outcome::Skipped(Skip::NotOurs), Transfer::default(), 0);
        s.record(&Outcome::Failed("x".into()), Transfer::default(), 0);
        assert_eq!(
            s.progress_line(Duration::from_secs(2)),
            "rekey: done 4 of 10 objects (2 skipped, 1 failed), 2.0 objects/s"
        );
        let lines = s.summary(Duration::from_millis(1500), false);
        assert_eq!(lines[1], "rekey: 1 rekeyed, 2 skipped (1 already on the new key, 1 not s3cryptfs objects of this mode), 1 failed");
        assert!(lines[2].contains("4 store requests") && lines[2].contains("2.0 KiB down"), "{}", lines[2]);
        assert!(lines[2].ends_with("per rekeyed object 3.0 requests, 1.5 KiB down, 1.0 KiB up"), "{}", lines[2]);
        s.record(&Outcome::Skipped(Skip::S3ecLeft("RSA")), Transfer::default(), 0);
        let lines = s.summary(Duration::from_millis(1500), false);
        assert_eq!(
            lines[1],
            "rekey: 1 rekeyed, 3 skipped (1 already on the new key, 1 not s3cryptfs objects of this mode, 1 S3EC \
             objects rekey cannot move), 1 failed"
        );
        let dry = Stats::new(0).summary(Duration::ZERO, true);
        assert!(dry[1].starts_with("rekey (dry run): 0 to rekey"), "{}", dry[1]);
    }

    #[test]
    fn byte_counts_read_as_people_write_them() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(10 << 20), "10.0 MiB");
    }
}
