//! The small types every layer speaks: a script `Version`, what made a job (`Trigger`), how
//! an attempt ended as stored (`RunStatus`), why one was skipped (`SkipReason`), a
//! schedule's `Overlap` and `CatchUp` policies, and the `named_enum!` that gives such enums
//! their one stable name each.

use std::fmt;

/// An enum whose variants each have one stable snake_case name, used in (de)serialisation,
/// storage, metric labels and command lines alike: `as_str`, `ALL`, `Display` (padded, so
/// table widths hold), `FromStr` and serde all come from the one list of names.
macro_rules! named_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident ($what:literal) {
            $($(#[$vmeta:meta])* $variant:ident = $text:literal,)+
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        $vis enum $name {
            $($(#[$vmeta])* #[serde(rename = $text)] $variant,)+
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: [$name; [$($text),+].len()] = [$($name::$variant),+];

            /// The variant's stable name.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.pad(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;

            fn from_str(s: &str) -> Result<Self, String> {
                $name::ALL
                    .into_iter()
                    .find(|v| v.as_str() == s)
                    .ok_or_else(|| {
                        let names: Vec<&str> = $name::ALL.iter().map(|v| v.as_str()).collect();
                        format!(concat!("unknown ", $what, " {:?} (one of {})"), s, names.join(", "))
                    })
            }
        }
    };
}
pub(crate) use named_enum;

named_enum! {
    /// How an attempt ended, as stored.
    pub enum RunStatus ("run status") {
        /// The handler returned a value.
        Ok = "ok",
        /// Failed; another attempt follows.
        Retrying = "retrying",
        /// Failed for the last time; the job went to the dead-letter subject.
        DeadLettered = "dead_lettered",
        /// Not run (see `SkipReason`).
        Skipped = "skipped",
        /// Failed, and not retried: a synchronous run (an HTTP request) is answered at once.
        Failed = "failed",
    }
}

named_enum! {
    /// Why an attempt was recorded as skipped instead of run (stored as its failure kind).
    pub enum SkipReason ("skip reason") {
        /// The script was deleted or disabled while the job waited.
        ScriptGone = "script_gone",
        /// The previous run of the schedule was still going (overlap policy `skip`).
        Overlap = "overlap",
        /// A replay pinned a version that no longer exists.
        VersionMissing = "version_missing",
    }
}

impl SkipReason {
    /// What the record's failure message says.
    pub fn message(self) -> &'static str {
        match self {
            SkipReason::ScriptGone => "the script was deleted or disabled while the job waited",
            SkipReason::Overlap => "the previous run of this schedule was still going",
            SkipReason::VersionMissing => "the version the replay pinned no longer exists",
        }
    }
}

named_enum! {
    /// What made a job: an event, a schedule occurrence, a dead letter's replay, or an HTTP
    /// request to the script's route (run at once, not queued).
    pub enum Trigger ("trigger") {
        Event = "event",
        Schedule = "schedule",
        Replay = "replay",
        Http = "http",
    }
}

/// What a schedule does when an occurrence comes while its previous run is still going.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Overlap {
    /// Do not start; record the occurrence as skipped.
    #[default]
    Skip,
    /// Start anyway: runs may overlap.
    Allow,
    /// Start when the running one ends; at most one occurrence waits, later ones are skipped.
    QueueOne,
}

/// What a schedule does with the occurrences missed while no daemon was running.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CatchUp {
    /// Run the latest missed occurrence once, with the number missed.
    #[default]
    None,
    /// Run every missed occurrence, oldest first, up to a bound.
    All,
}

impl Overlap {
    /// The name manifests and the database use.
    pub fn as_str(self) -> &'static str {
        match self {
            Overlap::Skip => "skip",
            Overlap::Allow => "allow",
            Overlap::QueueOne => "queue-one",
        }
    }
}

impl std::str::FromStr for Overlap {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "skip" => Ok(Overlap::Skip),
            "allow" => Ok(Overlap::Allow),
            "queue-one" => Ok(Overlap::QueueOne),
            other => Err(format!(
                "overlap {other:?} is not one of skip, allow, queue-one"
            )),
        }
    }
}

impl CatchUp {
    /// The name manifests and the database use.
    pub fn as_str(self) -> &'static str {
        match self {
            CatchUp::None => "none",
            CatchUp::All => "all",
        }
    }
}

impl std::str::FromStr for CatchUp {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(CatchUp::None),
            "all" => Ok(CatchUp::All),
            other => Err(format!("catch-up {other:?} is not one of none, all")),
        }
    }
}

/// A script's version number: 1 for the first deploy, one more for each new source (0 for
/// a draft that was never deployed). Stored as PostgreSQL `integer`, written as a plain
/// number on the wire.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct Version(u32);

impl Version {
    /// A source checked or tried before it is deployed (`scripts validate`, `scripts test`).
    pub const DRAFT: Version = Version(0);
    /// The first deployed version of a script.
    pub const FIRST: Version = Version(1);

    /// The version numbered `n`.
    pub const fn new(n: u32) -> Version {
        Version(n)
    }

    /// The version after this one.
    pub fn next(self) -> Version {
        Version(self.0 + 1)
    }

    /// The number.
    pub fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl std::str::FromStr for Version {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        s.trim_start_matches('v')
            .parse::<u32>()
            .ok()
            .filter(|n| *n >= 1)
            .map(Version)
            .ok_or_else(|| format!("{s:?} is not a version (a number from 1)"))
    }
}

impl tokio_postgres::types::ToSql for Version {
    fn to_sql(
        &self,
        ty: &tokio_postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        let n = i32::try_from(self.0)?;
        n.to_sql(ty, out)
    }

    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        <i32 as tokio_postgres::types::ToSql>::accepts(ty)
    }

    tokio_postgres::types::to_sql_checked!();
}

impl<'a> tokio_postgres::types::FromSql<'a> for Version {
    fn from_sql(
        ty: &tokio_postgres::types::Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let n = i32::from_sql(ty, raw)?;
        Ok(Version(u32::try_from(n)?))
    }

    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        <i32 as tokio_postgres::types::FromSql>::accepts(ty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_text_and_serde() {
        for status in RunStatus::ALL {
            assert_eq!(status.as_str().parse::<RunStatus>(), Ok(status));
        }
        for trigger in Trigger::ALL {
            assert_eq!(trigger.as_str().parse::<Trigger>(), Ok(trigger));
            let wire = serde_json::to_string(&trigger).unwrap();
            assert_eq!(wire, format!("\"{trigger}\""));
            assert_eq!(serde_json::from_str::<Trigger>(&wire).unwrap(), trigger);
        }
        assert_eq!(
            "sometimes".parse::<Trigger>(),
            Err("unknown trigger \"sometimes\" (one of event, schedule, replay, http)".into())
        );
        assert_eq!(format!("[{:<8}]", RunStatus::Ok), "[ok      ]");
    }

    #[test]
    fn versions_start_at_one_and_are_plain_numbers_on_the_wire() {
        assert_eq!("v3".parse::<Version>(), Ok(Version(3)));
        assert!("0".parse::<Version>().is_err());
        assert!("latest".parse::<Version>().is_err());
        assert_eq!(serde_json::to_string(&Version(7)).unwrap(), "7");
        assert_eq!(Version::FIRST.next().get(), 2);
    }
}
